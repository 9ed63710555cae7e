import sys

from ms_models.kernels import main

sys.exit(main())
