"""`python3 -m sohocloud_firstboot`: the same as the launcher /usr/lib/sohocloud/sohocloud-firstboot."""

import sys

from .main import main

sys.exit(main())
