"""A boxed module whose import-time code sends main a hostile first frame
(before the instance's Hello): a reply nested 5000 arrays deep."""

import os

import redteam

os.write(redteam.channel_write_fd(), redteam.deep_ok(1))
