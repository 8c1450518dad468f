import sys

from megatron_lcl.eval.dialogue.task import main

sys.exit(main())
