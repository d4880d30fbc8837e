import sys

from pipeline.cli import main

code = main()
if code == 0 and "torch.distributed" in sys.modules:  # leave a process group before exiting (see shut_down)
    from pipeline.distributed.engines import shut_down

    shut_down()
sys.exit(code)
