"""Training data, one module per job:

- :mod:`.records`: the JSONL manifest (records, persons, strict validation);
- :mod:`.identities`: identity index and the negative pool of the contrastive loss;
- :mod:`.images`: the one image reader, crop rules, reference crops;
- :mod:`.dataset`: what a phase asks of the data (:class:`DataOptions`) and its items;
- :mod:`.sampler`: the resumable, rank-sharded bucket batch sampler;
- :mod:`.cache`: cached text-encoder outputs;
- :mod:`.skips`: every bad sample skipped, named and counted; the stop rule (``data.max_bad_fraction``).
- :mod:`.sources`: where a run's batches come from (manifest, MultiID-2M, mix), one interface for the trainer;
- :mod:`.multiid2m`: the released MultiID-2M format, a package (format, references, landmarks, identities, stream, write).
"""

from .cache import TextEmbeddingCache
from .dataset import DataOptions, WithAnyoneDataset, collate, fixed_prompt
from .identities import IdentityIndex, NegativePool
from .images import crop_to_bucket, faces_inside, fit_to_bucket, load_rgb, square_crop
from .records import EMBEDDING_DIM, Manifest, ManifestError, Person, Record, parse_record
from .sampler import BucketBatchSampler, ItemKey, state_after
from .skips import BadDataError, SkipLedger

__all__ = [
    "EMBEDDING_DIM",
    "BadDataError",
    "BucketBatchSampler",
    "DataOptions",
    "IdentityIndex",
    "ItemKey",
    "Manifest",
    "ManifestError",
    "NegativePool",
    "Person",
    "Record",
    "SkipLedger",
    "TextEmbeddingCache",
    "WithAnyoneDataset",
    "collate",
    "crop_to_bucket",
    "faces_inside",
    "fit_to_bucket",
    "fixed_prompt",
    "load_rgb",
    "parse_record",
    "square_crop",
    "state_after",
]
