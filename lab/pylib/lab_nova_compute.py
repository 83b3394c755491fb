"""nova-compute with the lab's guest driver (run by lab.sh instead of the packaged launcher).

Nova (Zed) loads ``compute_driver`` only from inside ``nova.virt``; the lab's driver lives in
pylib/ (labguest_driver.py). This registers it as ``nova.virt.labguest`` — so the configuration
says ``compute_driver = labguest.LabGuestDriver`` — and then runs nova-compute exactly as the
packaged launcher does (``nova.cmd.compute`` monkey-patches eventlet first, on import).
"""

import sys

from nova.cmd import compute

import labguest_driver

sys.modules["nova.virt.labguest"] = labguest_driver

if __name__ == "__main__":
    sys.exit(compute.main())
