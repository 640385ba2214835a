"""What the system tests share besides fixtures: the emulator's distinctive secrets."""

from __future__ import annotations

#: The emulator's Muse password and Rescale API key in the system tests: distinctive, to look for in logs.
SYSTEM_PASSWORD = "system-pw-7Kq2-SECRET"
SYSTEM_KEY = "system-rk-91ad4e-SECRET"
