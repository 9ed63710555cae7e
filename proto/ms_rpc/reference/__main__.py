import os
import sys

# One BLAS thread unless told otherwise: OpenBLAS's spinning threads make the decoder's matrix-vector products ~40x
# slower on a small shared host (measured on 2 vCPUs); set OPENBLAS_NUM_THREADS to change it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .server import main  # noqa: E402 - after the BLAS setting, which numpy reads when imported

sys.exit(main())
