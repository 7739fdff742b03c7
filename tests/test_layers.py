"""The import layers: .importlinter, the package's modules and docs/architecture.md agree.

`lint-imports` (run by `./run test`) enforces the contracts; these tests keep the contracts
honest: every module is in exactly one layer, every layer has its own contract forbidding
exactly the layers above it, and the documented list is the enforced one.
"""

from __future__ import annotations

import configparser
import pkgutil
import re
from pathlib import Path

import pytest

import flywheel

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "flywheel"


def _config() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    assert parser.read(ROOT / ".importlinter"), "the .importlinter file is missing"
    return parser


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip()]


def _contracts(kind: str) -> dict[str, configparser.SectionProxy]:
    config = _config()
    return {
        name.split(":", 2)[2]: config[name]
        for name in config.sections()
        if name.startswith("importlinter:contract:") and config[name]["type"] == kind
    }


def _layers() -> list[list[str]]:
    """The layers contract's list, top first, as absolute module names."""
    layered = [c for c in _contracts("layers").values() if c.get("containers", "").strip() == PACKAGE]
    assert len(layered) == 1, "expected one layers contract with containers = flywheel"
    layers = []
    for line in _lines(layered[0]["layers"]):
        assert "|" not in line, "independence inside a layer is stated in its own contract"
        layers.append([f"{PACKAGE}.{tail.strip()}" for tail in line.split(":")])
    return layers


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(flywheel.__path__, f"{PACKAGE}."))


def _contains(entry: str, module: str) -> bool:
    return module == entry or module.startswith(entry + ".")


def test_the_linter_reads_the_package_without_type_checking_imports() -> None:
    settings = _config()["importlinter"]
    assert settings["root_package"].strip() == PACKAGE
    assert settings.getboolean("exclude_type_checking_imports") is True
    layered = next(c for c in _contracts("layers").values() if c.get("containers", "").strip() == PACKAGE)
    assert layered.getboolean("exhaustive") is True  # a new module must be given a layer


def test_the_layers_are_the_agreed_ones() -> None:
    names = [[m.removeprefix(f"{PACKAGE}.") for m in layer] for layer in _layers()]
    assert names == [
        ["cli", "__main__"],
        ["ui", "http", "demo"],
        ["runtime", "deliverer"],
        ["loop"],
        [
            "serving",
            "streaming",
            "feedback",
            "agreement",
            "review",
            "export",
            "export_sql",
            "compile",
            "gate",
            "scoring",
            "paired",
            "canary",
            "rollback",
            "retention",
        ],
        [
            "tracing",
            "span_rows",
            "calltree",
            "trace_sql",
            "trace_copy",
            "outbox",
            "registry",
            "host_reads",
            "loader",
            "programs",
            "dataset",
            "counters",
            "lm",
            "audit",
        ],
        ["store", "config", "errors", "limits", "heap"],
    ]


def test_every_module_is_in_exactly_one_layer() -> None:
    layers = _layers()
    modules = _modules()
    assert len(modules) > 30 and f"{PACKAGE}.ui.widgets" in modules  # the walk found the subpackages
    for module in modules:
        homes = [i for i, layer in enumerate(layers) for entry in layer if _contains(entry, module)]
        assert len(homes) == 1, f"{module} is in layers {homes}; it must be in exactly one"
    for layer in layers:  # and no layer names a module that is gone
        for entry in layer:
            assert entry in modules, f"{entry} is in .importlinter but not in the package"


@pytest.mark.parametrize("index", range(7))
def test_each_layer_has_its_own_contract_forbidding_the_layers_above(index: int) -> None:
    layers = _layers()
    assert len(layers) == 7
    forbidden = _contracts("forbidden")
    contract = forbidden.get(f"layer-{index + 1}")
    assert contract is not None, f"no [importlinter:contract:layer-{index + 1}] section"
    sources = set(_lines(contract["source_modules"]))
    targets = set(_lines(contract["forbidden_modules"]))
    if index == 0:  # the top layer: nothing below imports it
        assert targets == set(layers[0])
        assert sources == {m for layer in layers[1:] for m in layer}
    else:
        assert sources == set(layers[index])
        assert targets == {m for layer in layers[:index] for m in layer}
    assert contract.get("allow_indirect_imports", "false").strip().lower() != "true"
    assert contract.get("ignore_imports", "").strip() == "", "no exemptions from the layering"


def test_the_layers_contract_has_no_exemptions() -> None:
    for name, contract in _contracts("layers").items():
        assert contract.get("ignore_imports", "").strip() == "", name


def test_imports_cycles_are_checked() -> None:
    acyclic = _contracts("acyclic_siblings")
    assert any(_lines(c["ancestors"]) == [PACKAGE] for c in acyclic.values())


def test_docs_list_the_same_layers() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"<!-- layers:begin.*?```layers\n(.*?)```.*?<!-- layers:end -->", text, flags=re.S)
    assert block, "docs/architecture.md needs its <!-- layers:begin --> ... <!-- layers:end --> section"
    documented = [line.split() for line in _lines(block.group(1))]
    enforced = [[m.removeprefix(f"{PACKAGE}.") for m in layer] for layer in _layers()]
    assert documented == enforced
