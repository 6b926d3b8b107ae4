"""Repository basics: a license and a valid-looking CITATION.cff (CFF 1.2.0)."""

from __future__ import annotations

import re

import yaml

from vrp_utils.paths import REPO_ROOT

# Top-level keys of the CFF 1.2.0 schema (it allows no others).
CFF_KEYS = {
    "abstract", "authors", "cff-version", "commit", "contact", "date-released", "doi", "identifiers", "keywords",
    "license", "license-url", "message", "preferred-citation", "references", "repository", "repository-artifact",
    "repository-code", "title", "type", "url", "version",
}


def test_license_is_mit() -> None:
    text = (REPO_ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the vrp-book authors" in text


def test_citation_cff_has_the_required_keys() -> None:
    cff = yaml.safe_load((REPO_ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert {"cff-version", "message", "title", "authors"} <= set(cff) <= CFF_KEYS
    assert cff["cff-version"] == "1.2.0" and cff["version"] == "0.1.0" and cff["license"] == "MIT"
    assert cff["title"] == "vrp-book: an executable reproduction of the VLM Reliability Probe"
    assert cff["authors"] == [{"name": "vrp-book contributors"}]
    assert isinstance(cff["date-released"], str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", cff["date-released"])
    (paper,) = cff["references"]
    assert {"type", "title", "authors"} <= set(paper)  # required in every CFF reference
    assert paper["title"] == "Where Reliability Lives in Vision-Language Models"
    assert {"type": "other", "value": "arXiv:2605.08200", "description": "arXiv identifier"} in paper["identifiers"]
    assert all(isinstance(a, dict) and a.get("name") for a in paper["authors"])
