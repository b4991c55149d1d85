"""`python -m dgport.serve MODEL ...`"""

import sys

from .command import main

sys.exit(main())
