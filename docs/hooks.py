"""mkdocs hook (mkdocs.yml `hooks:`): the plots of the recorded studies live beside their runs in
baselines/<study>/report/*.png, outside docs/; this adds them to the site at the same paths, so a page under docs/
shows one as `![...](../baselines/<study>/report/<plot>.png)` without a copy in docs/."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent


def on_files(files, config):
    for plot in sorted(ROOT.glob("baselines/*/report/*.png")):
        files.append(
            File(
                plot.relative_to(ROOT).as_posix(),
                src_dir=str(ROOT),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
