"""The offline page template DVC fills for `dvc plots show/diff`, and the script that builds it from npm."""
import io
import json
import re
import tarfile

import pytest
from dvcrepo import REPO

from plots_template.update import PACKAGES, build

TEMPLATE = REPO / "plots_template" / "index.html"


def test_the_config_points_dvc_at_the_offline_template():
    config = (REPO / ".dvc" / "config").read_text()
    setting = re.search(r"html_template\s*=\s*(\S+)", config)
    assert setting, ".dvc/config sets no plots.html_template"
    assert (REPO / ".dvc" / setting.group(1)).resolve() == TEMPLATE  # DVC resolves it against .dvc/
    page = TEMPLATE.read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page  # {scripts} would bring back DVC's CDN tags
    assert not re.search(r"<script[^>]*\bsrc=", page), "the template loads a script from elsewhere"
    for package in PACKAGES:
        assert (REPO / "plots_template" / "licenses" / f"{package}.LICENSE").is_file(), package


def npm_tarball(folder, name, code, licence=True):
    """A minimal npm tarball of `name`: package.json, build/<name>.min.js holding `code`, maybe a LICENSE."""
    files = {"package.json": json.dumps({"name": name, "version": "1.2.3", "license": "BSD-3-Clause",
                                         "repository": f"owner/{name}"}),
             f"build/{name}.min.js": code}
    if licence:
        files["LICENSE"] = f"licence of {name}\n"
    path = folder / f"{name}-1.2.3.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for member, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"package/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_update_inlines_each_build_in_loading_order_with_its_licence(tmp_path):
    names = list(reversed(PACKAGES))  # any order of tarballs
    tarballs = [npm_tarball(tmp_path, name, f"var {name.replace('-', '_')} = 1;", licence=name != "vega")
                for name in names]
    build(tarballs, tmp_path / "out")
    page = (tmp_path / "out" / "index.html").read_text()
    positions = [page.index(f"var {name.replace('-', '_')} = 1;") for name in PACKAGES]
    assert positions == sorted(positions)  # vega-embed needs vega and vega-lite first
    assert "{plot_divs}" in page and "{refresh_tag}" in page and "{scripts}" not in page
    assert "vega 1.2.3 (BSD-3-Clause)" in page
    assert (tmp_path / "out" / "licenses" / "vega-lite.LICENSE").read_text() == "licence of vega-lite\n"
    assert "ships no LICENSE file" in (tmp_path / "out" / "licenses" / "vega.LICENSE").read_text()
    assert "https://github.com/owner/vega" in (tmp_path / "out" / "licenses" / "vega.LICENSE").read_text()


@pytest.mark.parametrize("code", ["x = '</script>';", "x = '{plot_divs}';"])
def test_update_refuses_code_that_would_break_the_page(tmp_path, code):
    tarballs = [npm_tarball(tmp_path, name, code if name == "vega-lite" else "1;") for name in PACKAGES]
    with pytest.raises(SystemExit, match="vega-lite's build contains"):
        build(tarballs, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_update_names_a_missing_package(tmp_path):
    with pytest.raises(SystemExit, match="no tarball of vega-embed"):
        build([npm_tarball(tmp_path, name, "1;") for name in ["vega", "vega-lite"]], tmp_path / "out")
