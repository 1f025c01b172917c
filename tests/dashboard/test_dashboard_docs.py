"""The pages of issue 9 stay true: API reference, configuration keys, metrics, manifests."""

from __future__ import annotations

import os
import re

import yaml

import corral
from corral import config

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")
SRC = os.path.join(os.path.dirname(corral.__file__))


def read(name: str) -> str:
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return f.read()


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_api_reference_lists_every_public_name_with_an_example():
    text = read("api.md")
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    documented = {}
    for section in sections:
        name = re.match(r"`([^`]+)`", section).group(1)
        documented[name] = section
    assert set(corral.__all__) <= set(documented), set(corral.__all__) - set(documented)
    for name in corral.__all__:
        assert "```python" in documented[name], f"{name} has no example"


def test_configuration_page_lists_every_key_and_variable():
    text = read("configuration.md")
    for option in config.OPTIONS:
        row = next(
            (line for line in text.splitlines() if line.startswith(f"| `{option.key}` |")), None
        )
        assert row is not None, f"{option.key} is not in docs/configuration.md"
        assert f"`{option.env_var}`" in row
        for name in option.env:
            assert f"`{name}`" in row


def test_documented_configuration_files_are_valid(tmp_path):
    texts = [code_blocks(read("configuration.md"), "yaml")[0]]
    for block in code_blocks(read("deployment.md"), "yaml"):
        for doc in yaml.safe_load_all(block):
            if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
                texts.append(doc["data"]["corral.yaml"])
            elif isinstance(doc, dict) and ("worker" in doc or "scheduler" in doc):
                texts.append(block)
    assert len(texts) >= 3
    for i, text in enumerate(texts):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        config.load(str(path), environ={})  # raises ConfigError if a key or value is wrong


def test_kubernetes_manifests_parse_and_have_the_parts():
    blocks = [b for b in code_blocks(read("deployment.md"), "yaml") if "apiVersion" in b]
    docs = [d for b in blocks for d in yaml.safe_load_all(b) if d]
    kinds = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert ("Service", "corral-scheduler") in kinds
    assert ("Deployment", "corral-scheduler") in kinds
    workers = [d for d in docs if d["kind"] == "Deployment" and "worker" in d["metadata"]["name"]]
    assert len(workers) == 2
    gpu = next(d for d in workers if "gpu" in d["metadata"]["name"])
    container = gpu["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "--resources" in container["args"]
    for d in docs:
        if d["kind"] == "Deployment":
            args = d["spec"]["template"]["spec"]["containers"][0]["args"]
            assert args[0] in ("scheduler", "worker")
    assert "FROM python:" in read("deployment.md") and "[Service]" in read("deployment.md")


def test_every_metric_is_documented():
    with open(os.path.join(SRC, "dashboard", "metrics.py"), encoding="utf-8") as f:
        names = set(re.findall(r'"(corral_[a-z_]+)"', f.read()))
    text = read("dashboard.md")
    assert len(names) >= 15
    for name in names:
        assert name in text, f"metric {name} is not in docs/dashboard.md"
