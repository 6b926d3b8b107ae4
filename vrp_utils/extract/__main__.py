from vrp_utils.extract.scale import main
import sys

sys.exit(main())
