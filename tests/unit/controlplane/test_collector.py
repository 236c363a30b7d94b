"""The control plane's collector settings (controlplane/collector.py)."""

from __future__ import annotations

import gc

from meshgate.controlplane.collector import OLD_THRESHOLD, tune_collector


def test_tuning_freezes_what_exists_and_checks_the_oldest_generation_less_often() -> None:
    saved = gc.get_threshold()
    try:
        tune_collector()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[2] == OLD_THRESHOLD > saved[2]
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)
