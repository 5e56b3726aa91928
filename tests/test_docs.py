"""
Tests for the documentation: the README's links into the code point at the functions they name (a link to a line
goes stale the day code above it moves), and the README stays a teaching page, within its 250-line budget, with the
history in docs/experiments.md.
    python -m pytest tests/test_docs.py -q
"""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# [`ppo.py:compute_gae`](ppo.py#L129) or [`model.py:GPT.forward`](model.py#L139)
CODE_LINK = re.compile(r"\[`(\w+\.py):([\w.]+)`\]\((\w+\.py)#L(\d+)\)")

def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()

def test_readme_code_links_point_at_the_definitions_they_name():
    """Each `file.py:name` link lands on the line that defines `name` (for `Class.method`, the method's def)."""
    links = CODE_LINK.findall(read("README.md"))
    assert len(links) >= 10, "the pipeline section links its equations to the code"
    for shown, name, target, line in links:
        assert shown == target, f"README.md: the link text says {shown} but the link goes to {target}"
        lines = read(target).splitlines()
        defines = re.compile(rf"\s*(def|class) {re.escape(name.split('.')[-1])}\b")
        where = [i + 1 for i, text in enumerate(lines) if defines.match(text)]
        assert int(line) in where, f"README.md: {target}:{name} links to line {line}; it is defined at {where}"

def test_readme_is_within_its_budget_and_points_to_the_experiments():
    """nanoGPT's README is 234 lines, nanochat's 230: ours keeps to 250, and the measured history lives in
    docs/experiments.md, which the README links to."""
    readme = read("README.md")
    assert len(readme.splitlines()) <= 250
    assert "docs/experiments.md" in readme and os.path.exists(os.path.join(ROOT, "docs", "experiments.md"))

def test_every_pointer_to_docs_experiments_names_a_section_that_exists():
    """Comments cite their evidence as docs/experiments.md#anchor; each anchor is a heading there (GitHub's rule:
    lower case, spaces to hyphens, punctuation dropped)."""
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", read("docs/experiments.md"), re.M)}
    sources = [n for n in os.listdir(ROOT) if n.endswith((".py", ".md", ".sh"))]
    sources += [os.path.join("data", d, n) for d in os.listdir(os.path.join(ROOT, "data"))
                if os.path.isdir(os.path.join(ROOT, "data", d)) for n in os.listdir(os.path.join(ROOT, "data", d))
                if n.endswith(".py")]
    cited = {(name, a) for name in sources for a in re.findall(r"docs/experiments\.md#([\w\-]+)", read(name))}
    assert cited, "the code cites its evidence"
    missing = sorted(c for c in cited if c[1] not in anchors)
    assert not missing, f"docs/experiments.md has no such section: {missing}"
