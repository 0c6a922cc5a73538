"""Interoperability with the official PyTorch EncDiff code (commit 596a29d): checkpoint import and export.

`official` holds the key/layout mapping (derived from our module trees) and the file readers and writers;
`import_official` and `export_official` are the command-line tools built on it.
"""
from concept_diffusion.interop.official import (  # noqa: F401
    OFFICIAL_COMMIT,
    StateDictMismatchError,
    check_betas,
    checkpoint_layout,
    export_state_dict,
    import_state_dict,
    load_state_dict,
    official_keys,
    save_state_dict,
)
