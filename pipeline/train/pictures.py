"""The routing picture: a text sample with the bytes the router sent to the latent blocks
highlighted, as HTML (exact bytes, hover for the byte's position and value) and PNG (for W&B and READMEs)."""

from __future__ import annotations

import html
from pathlib import Path


def _glyph(b: int) -> str:
    if b == 10:
        return "\u21b5"
    if 32 <= b < 127:
        return chr(b)
    if b >= 256:
        return "\u2205"
    return "\u00b7"  # non-ASCII and control bytes: one dot per byte keeps the grid aligned


def render_html(data: list[int], routed: list[bool], title: str) -> str:
    """The sample as an HTML page, routed bytes highlighted."""
    cells = []
    for i, (b, r) in enumerate(zip(data, routed)):
        tip = f"byte {i}: {b}"
        ch = html.escape(_glyph(b))
        style = "background:#f4a261;font-weight:bold" if r else ""
        cells.append(f'<span title="{tip}" style="{style}">{ch}</span>' + ("<br>" if b == 10 else ""))
    share = sum(routed) / max(1, len(routed))
    return (f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><h3>{html.escape(title)}</h3><p>routed {sum(routed)}/{len(routed)} bytes ({share:.1%}); "
            "highlighted bytes went through the latent blocks</p>"
            f"<pre style='font-size:14px;line-height:1.6'>{''.join(cells)}</pre></body></html>")


def render_png(data: list[int], routed: list[bool], path: Path, title: str, cols: int = 96) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = max(1, (len(data) + cols - 1) // cols)
    fig, ax = plt.subplots(figsize=(cols * 0.13, rows * 0.26 + 0.6))
    for i, (b, r) in enumerate(zip(data, routed)):
        x, y = i % cols, rows - 1 - i // cols
        if r:
            ax.add_patch(Rectangle((x, y), 1, 1, color="#f4a261"))
        ax.text(x + 0.5, y + 0.5, _glyph(b), ha="center", va="center", family="monospace", fontsize=7)
    ax.set_xlim(0, cols)
    ax.set_ylim(0, rows)
    ax.axis("off")
    ax.set_title(f"{title}  (orange: routed, {sum(routed)}/{len(routed)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_picture(data: list[int], routed: list[bool], folder: Path, name: str, title: str) -> tuple[Path, Path]:
    """Write `<name>.png` and `<name>.html` into `folder`, and copy them to `latest.*`."""
    folder.mkdir(parents=True, exist_ok=True)
    html_path, png_path = folder / f"{name}.html", folder / f"{name}.png"
    html_path.write_text(render_html(data, routed, title))
    render_png(data, routed, png_path, title)
    for path in (html_path, png_path):
        (folder / f"latest{path.suffix}").write_bytes(path.read_bytes())
    return png_path, html_path
