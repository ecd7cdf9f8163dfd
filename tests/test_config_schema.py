"""The configuration schema: <modules>, immutability, rendering, and the
generated reference in docs/configuration.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mlink import config_doc
from mlink.config import ConfigError, load_config, render_config
from mlink.config_model import DEFAULT_MODULES
from tests.modules_for_tests.greeter import Options

HEAD = """\
<mlink>
  <domain>example.com</domain>
  <listen type="c2s" port="0"/>
  <tls required="false"/>
"""
GREETER = "tests.modules_for_tests.greeter"
PLAIN = "tests.modules_for_tests.plain"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mlink.xml"
    path.write_text(text, encoding="utf-8")
    return path


def test_modules_default_set(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, HEAD + "</mlink>\n"))
    assert cfg.modules == DEFAULT_MODULES
    assert GREETER not in cfg.module_options


def test_modules_disable_add_and_options(tmp_path: Path) -> None:
    text = HEAD + f"""\
  <modules>
    <module name="{GREETER}"><greeting> hi </greeting><repeat>3</repeat></module>
    <module name="carbons" enabled="false"/>
    <module name="{PLAIN}"/>
    <module name="ping" enabled="true"/>
  </modules>
</mlink>
"""
    cfg = load_config(write(tmp_path, text))
    defaults = tuple(m for m in DEFAULT_MODULES if m != "carbons")
    assert cfg.modules == (*defaults, GREETER, PLAIN)
    assert cfg.module_options[GREETER] == Options(greeting="hi", repeat=3)
    assert PLAIN not in cfg.module_options
    with pytest.raises(TypeError):
        cfg.module_options["x"] = 1  # type: ignore[index]


def test_module_listed_without_options_gets_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, HEAD + f'<modules><module name="{GREETER}"/></modules>'
                                             "</mlink>"))
    assert cfg.module_options[GREETER] == Options()


BAD = [
    ('<modules>\n<module name="nosuchmodule"/></modules>', 6, "unknown module 'nosuchmodule'"),
    ('<modules>\n<module name="tests.nosuch.mod"/></modules>', 6, "unknown module"),
    ("<modules>\n<module/></modules>", 6, "needs a 'name'"),
    ('<modules>\n<module name="ping" colour="red"/></modules>', 6, "unknown attribute 'colour'"),
    ('<modules>\n<module name="ping" enabled="no"/></modules>', 6, "true or false"),
    (f'<modules>\n<module name="{PLAIN}">\n<x>1</x></module></modules>', 7,
     "takes no options"),
    (f'<modules>\n<module name="{GREETER}">\n<repeat>many</repeat></module></modules>', 7,
     f"<repeat> of module '{GREETER}' must be a whole number, not 'many'"),
    (f'<modules>\n<module name="{GREETER}">\n<repeat>11</repeat></module></modules>', 7,
     "must be 1..10"),
    (f'<modules>\n<module name="{GREETER}">\n<volume>3</volume></module></modules>', 7,
     "unknown option <volume>"),
    (f'<modules>\n<module name="{GREETER}">\n<loud>yes</loud></module></modules>', 7,
     "true or false"),
    (f'<modules>\n<module name="{GREETER}">\n<greeting>{"x" * 201}</greeting></module>'
     "</modules>", 6, "greeting longer than 200"),
    ('<modules>\n<module name="ping"/>\n<module name="ping"/></modules>', 7,
     "given twice (first at line 6)"),
    ('<modules>\n<plugin name="ping"/></modules>', 6, "unknown element <plugin>"),
    ('<modules/>\n<modules/>', 6, "<modules> given twice"),
]


@pytest.mark.parametrize(("body", "line", "words"), BAD)
def test_module_errors(tmp_path: Path, body: str, line: int, words: str) -> None:
    path = write(tmp_path, HEAD + body + "\n</mlink>\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: "), message
    assert words in message, message


def test_render_round_trip_with_modules(tmp_path: Path) -> None:
    text = HEAD + f"""\
  <limits stanza-bytes="40000"/>
  <modules>
    <module name="carbons" enabled="false"/>
    <module name="{GREETER}"><loud>true</loud></module>
  </modules>
</mlink>
"""
    cfg = load_config(write(tmp_path, text))
    again = tmp_path / "again.xml"
    again.write_text(render_config(cfg, tmp_path))
    loaded = load_config(again)
    assert dataclasses.replace(loaded, path=cfg.path) == cfg


def test_snapshot_is_immutable(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, HEAD + "</mlink>\n"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.limits.max_stanza_bytes = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.log_level = "debug"  # type: ignore[misc]
    assert isinstance(cfg.domains, tuple)


def test_reference_doc_is_current() -> None:
    """docs/configuration.md's reference is generated from the schema;
    after changing the schema, run `python -m mlink.config_doc --write`."""
    text = config_doc.DOC_FILE.read_text(encoding="utf-8")
    assert config_doc.BEGIN in text and config_doc.END in text
    assert config_doc.updated(text) == text, (
        "docs/configuration.md is stale: run python -m mlink.config_doc --write")
