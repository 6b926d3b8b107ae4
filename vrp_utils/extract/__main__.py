from vrp_utils.extract.engine import main
import sys

sys.exit(main())
