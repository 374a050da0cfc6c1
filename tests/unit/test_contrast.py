"""Every text colour the pages set reaches WCAG AA (4.5:1) on its background, light and dark.

The stylesheet (web/templates/base.html, and the rules /dev/mail adds) names each colour as a
variable, set once in ``:root`` and once under ``prefers-color-scheme: dark``. This test reads
that CSS, finds every rule that sets ``color``, resolves its variables in each scheme against the
rule's own background (or the page's, which it sits on) and computes the contrast ratio with
the WCAG 2 formula. A new rule with a colour is checked without anyone listing it here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TEMPLATES = Path(__file__).resolve().parents[2] / "web" / "templates"
AA_NORMAL_TEXT = 4.5
_DARK = re.compile(r"@media\s*\(prefers-color-scheme:\s*dark\)\s*\{\s*:root\s*\{([^}]*)\}\s*\}")
_RULE = re.compile(r"([^{}]+)\{([^{}]*)\}")
_VAR = re.compile(r"var\((--[\w-]+)\)")


def relative_luminance(hex_colour: str) -> float:
    """WCAG 2's relative luminance of an sRGB colour ``#rrggbb`` (or ``#rgb``)."""
    digits = hex_colour.lstrip("#")
    if len(digits) == 3:
        digits = "".join(d * 2 for d in digits)
    assert len(digits) == 6, f"an opaque colour is needed for a contrast ratio: {hex_colour}"
    channels = []
    for i in (0, 2, 4):
        c = int(digits[i : i + 2], 16) / 255
        channels.append(c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4)
    r, g, b = channels
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(foreground: str, background: str) -> float:
    """(L1 + 0.05) / (L2 + 0.05), the lighter luminance on top: 1 to 21."""
    a, b = relative_luminance(foreground), relative_luminance(background)
    return (max(a, b) + 0.05) / (min(a, b) + 0.05)


def _declarations(block: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for declaration in block.split(";"):
        name, sep, value = declaration.partition(":")
        if sep:
            found[name.strip()] = value.strip()
    return found


def _style(template: str) -> str:
    """The CSS of a template's ``<style>`` or ``{% block style %}``, comments removed."""
    source = (TEMPLATES / template).read_text()
    match = re.search(r"<style>(.*?)</style>", source, re.S) or re.search(
        r"\{% block style %\}(.*?)\{% endblock %\}", source, re.S
    )
    assert match, template
    return re.sub(r"/\*.*?\*/", "", match.group(1), flags=re.S)


def schemes() -> dict[str, dict[str, str]]:
    """The variables of each scheme: light from ``:root``, dark overriding them."""
    css = _style("base.html")
    dark = _DARK.search(css)
    assert dark, "base.html has no dark scheme"
    light_root = re.search(r":root\s*\{([^}]*)\}", css)
    assert light_root
    light = {k: v for k, v in _declarations(light_root.group(1)).items() if k.startswith("--")}
    return {"light": light, "dark": light | _declarations(dark.group(1))}


def coloured_rules() -> list[tuple[str, str, str]]:
    """(selector, colour, background) for every rule that sets ``color``, as written."""
    rules: list[tuple[str, dict[str, str]]] = []
    for template in ("base.html", "dev_mail.html"):
        css = _DARK.sub("", _style(template))
        css = re.sub(r"\{%.*?%\}", "", css)
        rules += [(m.group(1).strip(), _declarations(m.group(2))) for m in _RULE.finditer(css)]
    body = dict(rules)["body"]
    page_bg = body["background"]
    found = []
    for selector, declared in rules:
        colour = declared.get("color")
        if colour is None or colour == "inherit" or selector == ":root":
            continue
        found.append((selector, colour, declared.get("background", page_bg)))
    return found


def _resolve(value: str, variables: dict[str, str]) -> str:
    match = _VAR.fullmatch(value)
    return variables[match.group(1)] if match else value


def test_contrast_formula_matches_known_values() -> None:
    assert contrast_ratio("#000000", "#ffffff") == pytest.approx(21.0)
    assert contrast_ratio("#ffffff", "#ffffff") == pytest.approx(1.0)
    # #767676 on white is the classic lightest grey that passes AA: 4.54:1.
    assert contrast_ratio("#767676", "#fff") == pytest.approx(4.54, abs=0.01)
    assert contrast_ratio("#777777", "#ffffff") < AA_NORMAL_TEXT


def test_the_rules_that_matter_are_among_those_checked() -> None:
    selectors = {selector for selector, _, _ in coloured_rules()}
    # body text, links, both buttons, error text, hints, and /dev/mail's mail text.
    assert {"body", "a", "button", "button.secondary", ".error", ".hint", "pre"} <= selectors
    assert set(schemes()["light"]) == set(schemes()["dark"])  # dark overrides every colour


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_text_colour_meets_wcag_aa_in_both_schemes(scheme: str) -> None:
    variables = schemes()[scheme]
    failing = []
    for selector, colour, background in coloured_rules():
        fg, bg = _resolve(colour, variables), _resolve(background, variables)
        ratio = contrast_ratio(fg, bg)
        if ratio < AA_NORMAL_TEXT:
            failing.append(f"{selector}: {fg} on {bg} is {ratio:.2f}:1")
    assert not failing, failing
