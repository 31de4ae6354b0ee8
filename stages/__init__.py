"""The pipeline's stages (one module each, run by dvc.yaml as `python -m stages.<name>`) and the modules they
share. Python 3.11 or newer: the stages use hashlib.file_digest and `X | Y` annotations."""
import sys

if sys.version_info < (3, 11):  # before any module that needs 3.11 is imported: one line, not a traceback
    sys.exit(f"error: this project needs Python 3.11 or newer; this is Python "
             f"{'.'.join(map(str, sys.version_info[:3]))}")
