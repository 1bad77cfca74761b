"""CPU thread setup: thread counts from the free cores, the AVATAR_THREADS override, and passive
OpenMP waiting in the environment before torch loads (a fresh process through the stage path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from avatarcli.errors import AvatarError
from avatarcli.runtime import cpu_threads

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("cores, load, expected", [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 6.0, 1), (8, 3.2, 5), (8, 0.0, 8), (1, 0.0, 1),
])
def test_threads_are_the_free_cores(cores, load, expected):
    assert cpu_threads(cores, load) == expected


def test_env_override_wins_and_bad_values_are_one_clear_error():
    assert cpu_threads(2, 6.0, "3") == 3
    assert cpu_threads(2, 0.0, " ") == 2  # blank: as if unset
    for bad in ("0", "-1", "two"):
        with pytest.raises(AvatarError, match="AVATAR_THREADS"):
            cpu_threads(2, 0.0, bad)


PROBE = r"""
import importlib.abc, json, os, sys
seen = {}
class Hook(importlib.abc.MetaPathFinder):  # records the environment as torch is first imported
    def find_spec(self, name, path, target=None):
        if name == "torch" and "wait" not in seen:
            seen["wait"] = os.environ.get("OMP_WAIT_POLICY")
        return None
sys.meta_path.insert(0, Hook())
import avatarcli.cli.app  # the CLI's modules: must not import torch
seen["torch_after_cli"] = "torch" in sys.modules
from avatarcli.stage import RunContext
RunContext.create("cpu")
import torch
seen["threads"], seen["interop"] = torch.get_num_threads(), torch.get_num_interop_threads()
print(json.dumps(seen))
"""


def probe(**env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "AVATAR_THREADS")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**environ, **env}, cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_passive_waiting_is_set_before_torch_loads_and_override_sets_threads():
    seen = probe(AVATAR_THREADS="1")
    assert seen == {"wait": "PASSIVE", "torch_after_cli": False, "threads": 1, "interop": 1}


def test_a_user_wait_policy_is_kept():
    assert probe(OMP_WAIT_POLICY="ACTIVE", AVATAR_THREADS="2")["wait"] == "ACTIVE"
