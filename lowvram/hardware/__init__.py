"""The machine: read its facts, decide what it can really run, self-test it, report it (``lowvram doctor``).

Read-only: nothing here changes torch's global state. The rooms: ``facts`` (reading), ``caps`` (capability
tables and ``HardwareInfo``), ``probe`` (deciding), ``advice`` (notes), ``selftest``, ``install``
(installed packages and platform mistakes), ``report`` (``lowvram doctor``). Which preset suits the machine is
the presets' business (``lowvram.presets.recommend_preset``, re-exported here with the mismatch warning).
"""

from ..presets import recommend_preset, warn_if_preset_mismatch
from .caps import GIB, ArchCaps, HardwareInfo, arch_caps, is_gtx16
from .facts import DeviceFacts, read_facts
from .probe import probe
from .report import doctor, doctor_dict, doctor_report
from .selftest import (
    SelfTestResult,
    default_self_test_dtypes,
    run_self_test_or_raise,
    self_test,
    self_test_fix,
)

__all__ = [
    "GIB",
    "ArchCaps",
    "DeviceFacts",
    "HardwareInfo",
    "SelfTestResult",
    "arch_caps",
    "default_self_test_dtypes",
    "doctor",
    "doctor_dict",
    "doctor_report",
    "is_gtx16",
    "probe",
    "read_facts",
    "recommend_preset",
    "run_self_test_or_raise",
    "self_test",
    "self_test_fix",
    "warn_if_preset_mismatch",
]
