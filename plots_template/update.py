"""Rebuild plots_template/index.html, the page template `dvc plots show/diff` fill (.dvc/config points at it).

DVC's default page loads Vega, Vega-Lite and vega-embed from a CDN, so offline it shows no charts. This page
carries their minified builds inline instead: fetched from the npm registry with `npm pack`, so the page DVC
writes is one self-contained file that opens anywhere, wherever it is written (-o DIR) or copied.

    python plots_template/update.py          # the newest vega@5, vega-lite@5, vega-embed@6 (needs npm)
    python plots_template/update.py --from DIR   # .tgz files that `npm pack` already wrote into DIR

The major versions are the ones DVC's own template loads (dvc_render's VegaRenderer.SCRIPTS)."""
import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = {"vega": "5", "vega-lite": "5", "vega-embed": "6"}  # name: major version, in loading order
PLACEHOLDERS = ["{plot_divs}", "{refresh_tag}", "{scripts}"]  # what dvc_render replaces in the template

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- {versions}: inlined from the npm registry by plots_template/update.py, so the page needs no
         network; licences in plots_template/licenses/ -->
{scripts}
    <script>
    // DVC's page calls vegaEmbed(selector, spec) once per chart. Draw SVG (crisp, and readable as a DOM), show a
    // failure on the page rather than only in the console, and record each chart's outcome in data-vega.
    (function () {{
        const embed = window.vegaEmbed;
        window.vegaEmbed = function (selector, spec, options) {{
            const element = document.querySelector(selector);
            return embed(selector, spec, Object.assign({{renderer: "svg"}}, options)).then(function (result) {{
                element.dataset.vega = "rendered";
                return result;
            }}, function (error) {{
                element.dataset.vega = "error";
                element.insertAdjacentText("beforeend", "Error: " + error.message);
                throw error;
            }});
        }};
    }})();
    </script>
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def npm_pack(folder):
    """Download each package's tarball into `folder` with npm; return their paths."""
    specs = [f"{name}@{major}" for name, major in PACKAGES.items()]
    try:
        out = subprocess.run(["npm", "pack", "--json", *specs], cwd=folder, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        sys.exit("error: npm not found; install Node.js, or pass --from DIR with the packages' .tgz files")
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: npm pack {' '.join(specs)} failed: {e.stderr.strip().splitlines()[-1:]}")
    return [Path(folder) / entry["filename"] for entry in json.loads(out.stdout)]


def read_package(tarball):
    """(package.json as a dict, the minified browser build, the LICENSE text or None) of an npm tarball."""
    with tarfile.open(tarball) as tar:
        def member(name):
            try:
                return tar.extractfile(f"package/{name}").read().decode("utf8")
            except KeyError:
                return None
        meta = json.loads(member("package.json"))
        return meta, member(f"build/{meta['name']}.min.js"), member("LICENSE")


def script_tag(name, code):
    # Inline code must not end the <script> element early, nor hold text DVC would replace.
    for bad in ["</script", "<!--", *PLACEHOLDERS]:
        if bad in code:
            sys.exit(f"error: {name}'s build contains {bad!r}; it cannot be inlined as is")
    return f"    <script>\n{code}\n    </script>"


def licence_text(meta, text):
    if text is not None:
        return text
    # the vega package declares its licence in package.json but ships no LICENSE file
    repository = meta.get("repository", "")
    repository = repository.get("url", "") if isinstance(repository, dict) else repository
    if "/" in repository and ":" not in repository:  # npm's shorthand owner/name means GitHub
        repository = f"https://github.com/{repository}"
    return (f"The npm package {meta['name']} {meta['version']} declares the licence {meta['license']!r} in its "
            f"package.json but ships no LICENSE file.\nThe licence text is in its repository: {repository}\n")


def build(tarballs, out_dir=HERE):
    """Write out_dir/index.html and out_dir/licenses/ from the npm tarballs of PACKAGES."""
    packages = {}
    for tarball in tarballs:
        meta, code, text = read_package(tarball)
        packages[meta["name"]] = meta, code, text
    missing = set(PACKAGES) - set(packages)
    if missing:
        sys.exit(f"error: no tarball of {', '.join(sorted(missing))}")
    tags, versions, licences = [], [], {}
    for name in PACKAGES:  # vega-embed needs vega and vega-lite loaded first
        meta, code, text = packages[name]
        if code is None:
            sys.exit(f"error: {name} {meta['version']} has no build/{name}.min.js")
        tags.append(script_tag(name, code))
        versions.append(f"{name} {meta['version']} ({meta['license']})")
        licences[name] = licence_text(meta, text)
    page = PAGE.format(versions=", ".join(versions), scripts="\n".join(tags),
                       refresh_tag="{refresh_tag}", plot_divs="{plot_divs}")
    # written only once every package checked out, so a failed update leaves the old template whole
    (Path(out_dir) / "licenses").mkdir(parents=True, exist_ok=True)
    for name, text in licences.items():
        (Path(out_dir) / "licenses" / f"{name}.LICENSE").write_text(text)
    (Path(out_dir) / "index.html").write_text(page, encoding="utf8")
    print(f"wrote {Path(out_dir) / 'index.html'} ({len(page) // 1024} KiB): {', '.join(versions)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="folder", type=Path, help="a folder of npm .tgz files (skips npm pack)")
    args = parser.parse_args()
    if args.folder:
        build(sorted(args.folder.glob("*.tgz")))
        return
    with tempfile.TemporaryDirectory() as folder:
        build(npm_pack(folder))


if __name__ == "__main__":
    main()
