"""MultiID-2M: the authors' released dataset, streamed from webdataset-layout tars.

Layout (``MultiID-2M/README.md``, the authors' ``negativeloader_full.py``): each sample is
``<key>.jpg`` + ``<key>.json`` + ``<key>.npy`` next to each other in a tar. The ``.npy`` is a
*pickled* dict (``np.save`` of a dict): ``bboxes`` ([x1, y1, x2, y2] in the original photo's
pixels) and ``embeddings`` (or ``embedding``: one raw antelopev2 vector per box, box order).
The JSON holds ``caption_en``, ``crop`` ([x1, y1, x2, y2] of the photo inside the original:
boxes are shifted by its corner), the names (``name`` list, else ``names``, else
``keyword`` split on spaces; ``none`` / missing: unidentifiable), ``url``, ``ram_score``,
``aesthetics_score``. References: ``<refs>/<name>/*.{jpg,json,npy}`` (untarred, or read from
``ref/tars/*.tar`` in place: :mod:`.references`); cluster centres:
``<centres>/<name>.npy`` or ``ref/cluster_centers.tar``.

Pickles are never loaded with :mod:`pickle` defaults: :func:`load_npy` accepts only dicts,
lists, tuples, numbers, strings and numpy arrays, and refuses any other global *before*
anything is called (:class:`UnsafePickleError` names the shard and member).

The stream (:class:`MultiID2MStream`) is an ``IterableDataset`` yielding collated batches of
one bucket and person count. Shards are split over (rank, DataLoader worker) slots:
shard-wise when there are at least as many shards as slots, else sample-wise (every slot
reads every shard and keeps every n-th sample); never a sample twice per epoch. The order
(shard shuffle, sample buffer) and every random choice of an item come from the seed, the
epoch and the slot/sample, so a resumed stream skips the batches already consumed (without
decoding their images) and continues bit-identically.

One module per job, each importing only the ones above it:

- :mod:`.format`: errors, the restricted unpickler, ``.npy`` members, tar iteration, one sample's parsing;
- :mod:`.references`: reference photos, from an untarred folder or read from ``ref/tars/*.tar`` in place;
- :mod:`.landmarks`: the GT faces' landmarks, detected once per shard and cached;
- :mod:`.identities`: cluster centres, identity numbers, the negative pool;
- :mod:`.stream`: :class:`MultiID2MStream`;
- :mod:`.write`: the same layout written (``prepare.py --format multiid2m``, the smoke set).
"""

from .format import (
    COMPRESSED_SHARD_SUFFIXES,
    ShardFormatError,
    StreamPerson,
    StreamSample,
    UnsafePickleError,
    check_boxes,
    check_embeddings,
    embeddings_of,
    expand_shards,
    iter_tar_samples,
    load_npy,
    parse_sample,
    parsed_samples,
    person_names,
    save_pickled_npy,
)
from .identities import (
    MAX_REFS_PER_IDENTITY,
    IdentityNumbers,
    negative_pool_tensors,
    read_cluster_centres,
)
from .landmarks import (
    detect_landmarks,
    landmark_file,
    load_landmarks,
    read_landmark_file,
)
from .references import (
    INDEX_VERSION,
    MAX_OPEN_TARS,
    REFERENCE_SUFFIXES,
    CompressedTarError,
    ReferenceFolder,
    ReferenceTars,
    RefMember,
    check_plain_tar,
    decode_image,
    expand_reference_tars,
    index_file,
    is_reference_folder,
    open_references,
    reference_entry,
    scan_tar,
)
from .stream import (
    MAX_PERSONS,
    MultiID2MStream,
)
from .write import (
    PROGRESS_VERSION,
    jpeg_bytes,
    write_manifest_shards,
    write_multiid2m,
    write_records_shard,
    write_reference_chunk,
    write_references,
    write_shard,
)

__all__ = [
    "COMPRESSED_SHARD_SUFFIXES",
    "CompressedTarError",
    "INDEX_VERSION",
    "IdentityNumbers",
    "MAX_OPEN_TARS",
    "MAX_PERSONS",
    "MultiID2MStream",
    "MAX_REFS_PER_IDENTITY",
    "PROGRESS_VERSION",
    "REFERENCE_SUFFIXES",
    "RefMember",
    "ReferenceFolder",
    "ReferenceTars",
    "ShardFormatError",
    "StreamPerson",
    "StreamSample",
    "UnsafePickleError",
    "check_boxes",
    "check_embeddings",
    "check_plain_tar",
    "decode_image",
    "detect_landmarks",
    "embeddings_of",
    "expand_reference_tars",
    "expand_shards",
    "index_file",
    "is_reference_folder",
    "iter_tar_samples",
    "jpeg_bytes",
    "landmark_file",
    "load_landmarks",
    "load_npy",
    "negative_pool_tensors",
    "open_references",
    "parse_sample",
    "parsed_samples",
    "person_names",
    "read_cluster_centres",
    "read_landmark_file",
    "reference_entry",
    "save_pickled_npy",
    "scan_tar",
    "write_manifest_shards",
    "write_multiid2m",
    "write_records_shard",
    "write_reference_chunk",
    "write_references",
    "write_shard",
]
