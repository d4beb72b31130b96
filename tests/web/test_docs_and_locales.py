"""What the frontend shows of the nodes besides the editor: help pages, locales (English and Chinese, also
in the running frontend) and tooltips."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest

from support.comfy_env import PACK_NAME, ROOT

from .pages import ADD_LAYOUT_NODE, open_app, our_nodes

pytestmark = pytest.mark.slow


CJK = re.compile(r"[\u4e00-\u9fff]")


def test_every_node_has_a_help_page(pinned_server):
    """web/docs/<node id>.md is what the frontend's node help panel shows (served under /extensions/)."""
    url = pinned_server
    missing = []
    for node_id, info in our_nodes(url).items():
        try:
            page = urllib.request.urlopen(f"{url}/extensions/{PACK_NAME}/docs/{node_id}.md", timeout=30).read().decode()
        except urllib.error.HTTPError:
            missing.append(node_id)
            continue
        assert page.splitlines()[0] == f"# {info['display_name']}", f"web/docs/{node_id}.md: title != display name"
        assert len(page) > 300, f"web/docs/{node_id}.md says too little"
        # the Chinese page the frontend picks for the zh locale
        try:
            zh = (
                urllib.request.urlopen(f"{url}/extensions/{PACK_NAME}/docs/{node_id}/zh.md", timeout=30).read().decode()
            )
        except urllib.error.HTTPError:
            missing.append(f"{node_id}/zh")
            continue
        assert zh.startswith("# ") and CJK.search(zh.splitlines()[0]), f"web/docs/{node_id}/zh.md: no Chinese title"
    assert not missing, f"add help pages web/docs/<node id>.md and web/docs/<node id>/zh.md for: {missing}"


def test_locales_cover_every_node_input_and_output(pinned_server):
    """locales/{en,zh}/nodeDefs.json against the live /object_info: every node's name and description, every
    input and output (name, and tooltip where the schema has one). English is the schema's own text; Chinese
    is a translation (tooltips and descriptions hold Chinese characters). Fix: run python -m dev.build_locales."""
    from dev.build_locales import english_node_defs

    url = pinned_server
    info = json.load(urllib.request.urlopen(url + "/object_info", timeout=60))
    expected = english_node_defs(info, f"custom_nodes.{PACK_NAME}")
    assert expected
    locales = {lang: json.loads((ROOT / "locales" / lang / "nodeDefs.json").read_text()) for lang in ("en", "zh")}
    problems = []
    for node_id, entry in expected.items():
        if locales["en"].get(node_id) != entry:
            problems.append(f"en: {node_id} differs from the node's schema")
        zh = locales["zh"].get(node_id)
        if not zh:
            problems.append(f"zh: no entry for {node_id}")
            continue
        for field in ("display_name", "description"):
            if field in entry and not zh.get(field):
                problems.append(f"zh: {node_id}.{field} missing")
        if "description" in entry and not CJK.search(zh.get("description", "")):
            problems.append(f"zh: {node_id}.description is not translated")
        for part in ("inputs", "outputs"):
            for key, slot in entry[part].items():
                got = zh.get(part, {}).get(key, {})
                if not got.get("name"):
                    problems.append(f"zh: {node_id}.{part}.{key}.name missing")
                if "tooltip" in slot and not CJK.search(got.get("tooltip", "")):
                    problems.append(f"zh: {node_id}.{part}.{key}.tooltip missing or untranslated")
    assert not problems, "run python -m dev.build_locales (it lists what to translate):\n" + "\n".join(problems)
    # ComfyUI serves them to the frontend
    served = json.load(urllib.request.urlopen(url + "/i18n", timeout=30))
    assert served["zh"]["nodeDefs"]["WithAnyoneLayout"] == locales["zh"]["WithAnyoneLayout"]
    assert served["en"]["nodeDefs"]["WithAnyoneLayout"] == locales["en"]["WithAnyoneLayout"]


def test_chinese_locale_in_the_frontend(latest_server, browser):
    """With the frontend's language set to Chinese, the node shows the zh locale's names. Checked on the newest
    frontend: with 1.32.9 our node titles stay English although /i18n serves the same files (its core nodes,
    translated from its own bundle, do change)."""
    url = latest_server
    zh = json.loads((ROOT / "locales" / "zh" / "nodeDefs.json").read_text())["WithAnyoneLayout"]

    def set_locale(value):
        req = urllib.request.Request(
            url + "/settings/Comfy.Locale",
            data=json.dumps(value).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(req, timeout=30)

    set_locale("zh")
    try:
        page, page_errors = open_app(browser, url)
        node_id = page.evaluate(ADD_LAYOUT_NODE, [120, 120])
        shown = page.evaluate(
            """(id) => {
            const node = app.graph.getNodeById(id);
            const width = node.widgets.find((w) => w.name === "width");
            return {title: node.title, width: width.label ?? null};
        }""",
            node_id,
        )
        assert shown["title"] == zh["display_name"], shown
        assert shown["width"] == zh["inputs"]["width"]["name"], shown
        assert not page_errors, page_errors
        page.close()
    finally:
        set_locale("en")


def test_every_input_and_output_has_a_tooltip(pinned_server):
    """TOOLTIPS: fails only when a node schema lacks a tooltip (the node authors' part, nodes/*.py); the
    message lists every input and output without one."""
    url = pinned_server
    missing = []
    for node_id, info in our_nodes(url).items():
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                if not (len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("tooltip")):
                    missing.append(f"{node_id} input {name}")
        tooltips = info.get("output_tooltips") or []
        for index, name in enumerate(info.get("output_name") or []):
            if index >= len(tooltips) or not tooltips[index]:
                missing.append(f"{node_id} output {index} ({name})")
    assert not missing, f"{len(missing)} inputs/outputs without a tooltip:\n" + "\n".join(missing)
