"""Work that one process does for all: the main process runs it, every rank learns how it went."""

from __future__ import annotations


def main_process_first(accelerator, work, what: str):
    """``work()`` on the main process only, then every process goes on; if it raised, every
    process stops with its message instead of waiting at a barrier for a rank that is gone
    (a corrupt tar during indexing would otherwise hang the others until the NCCL timeout)."""
    error, result = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except Exception as exc:  # re-raised below, after the other ranks have been told
            error = exc
    message = [f"{type(error).__name__}: {error}" if error is not None else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(message, from_process=0)  # a collective: also the barrier
    if error is not None:
        raise error
    if message[0] is not None:
        raise RuntimeError(f"the main process failed while {what}: {message[0]}")
    return result
