"""Draw the mailpipe lab architecture (see architecture.md) from the lab config.

Usage:  python diagrams/make_architecture.py [--out DIR]

Writes architecture.svg and architecture.png (next to this script by
default). Every address, port and host name comes from
``agents.config.LabConfig``, so the picture follows the lab's TOML file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # so that "agents" imports from a checkout
from agents.config import LabConfig  # noqa: E402

# Keep text as text in the SVG (searchable, selectable), not as glyph outlines.
plt.rcParams["svg.fonttype"] = "none"

# Layout, in inches (the axes span the whole figure, 1 data unit = 1 inch).
COL_W, GAP, MARGIN = 5.6, 5.0, 0.5   # a domain column, the space between two
BOX_W = 4.0                          # width of an agent box
ROWS = {"mua": (7.75, 0.9), "msa": (5.85, 1.4), "mta": (3.75, 1.1), "mda": (1.55, 1.4)}
HEIGHT = 10.0

ROLE_COLOUR = {"mua": "#eeeeee", "msa": "#fde7c8", "mta": "#d6e6f7", "mda": "#d9f0d3", "dns": "#efe3f6"}
DOMAIN_COLOUR = ["#f3f8fd", "#f4fbf2", "#fdf8f0", "#f8f3fb"]
JOURNEY, OTHER, LOOKUP = "#1f4e79", "#a0a0a0", "#7b4f9d"


def box(ax, cx, cy, h, title, lines, role, w=BOX_W):
    """An agent: a rounded box with a bold title line; returns its edges."""
    ax.add_patch(FancyBboxPatch((cx - w / 2, cy - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.12",
                                fc=ROLE_COLOUR[role], ec="#555555", lw=1.2, zorder=2))
    top = cy + h / 2 - 0.12
    ax.text(cx, top, title, ha="center", va="top", fontsize=10.5, weight="bold", zorder=3)
    ax.text(cx, top - 0.3, "\n".join(lines), ha="center", va="top", fontsize=9,
            linespacing=1.45, zorder=3)
    return {"x": cx, "y": cy, "l": cx - w / 2, "r": cx + w / 2, "t": cy + h / 2, "b": cy - h / 2}


def arrow(ax, start, end, colour, dashed=False, lw=1.8):
    ax.annotate("", xy=end, xytext=start, zorder=4,
                arrowprops=dict(arrowstyle="-|>", color=colour, lw=lw, mutation_scale=16,
                                linestyle=(0, (5, 3)) if dashed else "-", shrinkA=0, shrinkB=0))


def label(ax, x, y, text, colour, ha="left", **kw):
    ax.text(x, y, text, ha=ha, va="center", fontsize=8.5, color=colour, zorder=5,
            linespacing=1.3, **kw)


def step(ax, x, y, n):
    """A numbered circle on an arrow: step n of the walk-through in architecture.md."""
    ax.text(x, y, str(n), ha="center", va="center", fontsize=8, color="white", weight="bold",
            zorder=6, bbox=dict(boxstyle="circle,pad=0.25", fc=JOURNEY, ec="white", lw=1))


def draw_domain(ax, config, d, x0, colour, side, journey_role):
    """One provider: a panel with MUA, MSA, MTA and MDA and the arrows inside it.

    side is -1 if the outer (free) side of the column is to the left, +1 if right.
    journey_role is "sender", "recipient" or None: which arrows carry the example.
    """
    p = config.ports
    cx = x0 + COL_W / 2
    ax.add_patch(FancyBboxPatch((x0, 0.3), COL_W, HEIGHT - 1.4, boxstyle="round,pad=0,rounding_size=0.25",
                                fc=colour, ec="#8a8a8a", lw=1.2, zorder=1))
    ax.text(cx, HEIGHT - 1.4, f"{d.name}  —  {d.address}", ha="center", va="center",
            fontsize=13, weight="bold", zorder=3)

    b = {}
    users = ", ".join(u.local_part for u in config.users_of(d.name)) or "a user"
    command = {"sender": "mailpipe send", "recipient": "mailpipe fetch / watch"}
    if d.has_mailboxes:
        b["mua"] = box(ax, cx, *ROWS["mua"], f"MUA ({users})",
                       [command.get(journey_role, "mailpipe send / fetch")], "mua")
        b["msa"] = box(ax, cx, *ROWS["msa"], f"MSA  {d.host('msa')}",
                       [f"submission {p['submission']} STARTTLS",
                        f"submissions {p['submissions']} TLS",
                        "AUTH PLAIN / LOGIN"], "msa")
    b["mta"] = box(ax, cx, *ROWS["mta"], f"MTA  {d.host('mta')}",
                   [f"smtp {p['smtp']}  ·  spool + queue"], "mta")
    if d.has_mailboxes:
        b["mda"] = box(ax, cx, *ROWS["mda"], f"MDA  {d.host('mda')}",
                       [f"{d.host('lmtp')}: lmtp {p['lmtp']} → Maildir",
                        f"imap {p['imap']}  ·  imaps {p['imaps']}",
                        f"pop3 {p['pop3']}  ·  pop3s {p['pop3s']}"], "mda")
        send = journey_role == "sender"
        recv = journey_role == "recipient"
        for upper, lower, text, on_path, n in [
            ("mua", "msa", "SMTP submission, RFC 6409\nSTARTTLS + AUTH", send, 1),
            ("msa", "mta", "SMTP, RFC 5321", send, 2),
            ("mta", "mda", "LMTP, RFC 2033" + ("" if recv else f"\n(mail for {d.name})"), recv, 4),
        ]:
            c = JOURNEY if on_path else OTHER
            arrow(ax, (cx, b[upper]["b"]), (cx, b[lower]["t"]), c)
            mid = (b[upper]["b"] + b[lower]["t"]) / 2
            label(ax, cx + 0.3, mid, text, c)
            if on_path:
                step(ax, cx, mid, n)
        # MDA -> MUA: around the outer side of the column.
        c = JOURNEY if recv else OTHER
        edge = "l" if side < 0 else "r"
        xr = b["mda"][edge] + side * 0.35
        ax.plot([b["mda"][edge], xr, xr], [b["mda"]["y"], b["mda"]["y"], b["mua"]["y"]],
                color=c, lw=1.8, zorder=4, solid_joinstyle="miter")
        arrow(ax, (xr, b["mua"]["y"]), (b["mua"][edge], b["mua"]["y"]), c)
        ax.text(xr + side * 0.15, (b["msa"]["y"] + b["mta"]["y"]) / 2, "IMAP4rev1 + IDLE,  POP3",
                rotation=90, ha="center", va="center", fontsize=8.5, color=c, zorder=5)
        if recv:
            step(ax, xr, (b["mua"]["b"] + b["msa"]["t"]) / 2, 5)
    return b


def build_figure(config: LabConfig):
    """The architecture figure for a lab config (two or more domains)."""
    if len(config.domains) < 2:
        raise ValueError("the diagram needs at least two domains")
    n = len(config.domains)
    width = 2 * MARGIN + n * COL_W + (n - 1) * GAP
    fig = plt.figure(figsize=(width, HEIGHT))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, width)
    ax.set_ylim(0, HEIGHT)
    ax.axis("off")

    src, dst = config.domains[0], config.domains[1]  # the example: first -> second domain
    sender = next((u.local_part for u in config.users_of(src.name)), "user")
    recipient = next((u.local_part for u in config.users_of(dst.name)), "user")
    ax.text(width / 2, HEIGHT - 0.4, "mailpipe lab: every box is its own process on a loopback address",
            ha="center", va="center", fontsize=15, weight="bold")
    ax.text(width / 2, HEIGHT - 0.75, "Agents find each other through the lab DNS, as on the internet; "
            "ports are the standard ones + 1000.", ha="center", va="center", fontsize=10.5, color="#444444")

    boxes = []
    for i, d in enumerate(config.domains):
        x0 = MARGIN + i * (COL_W + GAP)
        role = "sender" if d is src else "recipient" if d is dst else None
        boxes.append(draw_domain(ax, config, d, x0, DOMAIN_COLOUR[i % len(DOMAIN_COLOUR)],
                                 -1 if i == 0 else 1, role))
    s, r = boxes[0], boxes[1]

    # MTA -> MTA across the internet (here: across loopback addresses).
    y = s["mta"]["y"] - 0.15
    arrow(ax, (s["mta"]["r"], y), (r["mta"]["l"], y), JOURNEY, lw=2.2)
    mid = (s["mta"]["r"] + r["mta"]["l"]) / 2
    label(ax, mid, y + 0.28, "SMTP relay by MX, RFC 5321", JOURNEY, ha="center", weight="bold")
    label(ax, mid, y - 0.28, f"STARTTLS (lab CA), from {src.address} to {dst.address}", JOURNEY,
          ha="center")
    step(ax, s["mta"]["r"] + 0.6, y, 3)

    # The lab DNS, between the first two domains, and who asks it what.
    dns = box(ax, mid, 6.15, 1.05, f"DNS  {config.dns_address}:{config.ports['dns']}",
              ["twisted.names, authoritative", "MX, A, TXT for every lab domain"], "dns", w=3.3)
    if "mua" in s:
        arrow(ax, (s["mua"]["r"], s["mua"]["y"]), (dns["l"] + 0.3, dns["t"]), LOOKUP, dashed=True, lw=1.4)
        label(ax, s["mua"]["r"] + 0.15, s["mua"]["y"] + 0.3, f"A {src.host('msa')}?", LOOKUP, style="italic")
    if "mua" in r:
        arrow(ax, (r["mua"]["l"], r["mua"]["y"]), (dns["r"] - 0.3, dns["t"]), LOOKUP, dashed=True, lw=1.4)
        label(ax, r["mua"]["l"] - 0.15, r["mua"]["y"] + 0.3, f"A {dst.host('mda')}?", LOOKUP,
              ha="right", style="italic")
    arrow(ax, (s["mta"]["r"], s["mta"]["t"] - 0.2), (dns["l"] + 0.5, dns["b"]), LOOKUP, dashed=True, lw=1.4)
    label(ax, dns["l"] + 0.75, (s["mta"]["t"] + dns["b"]) / 2 + 0.05,
          f"MX {dst.name}?\nA {dst.host('mta')}?", LOOKUP, style="italic")

    # Legend, in the free space between the first two domains.
    x, y = s["mta"]["r"] + 0.9, 1.9
    for colour, style, text in [
        (JOURNEY, "-", f"one message {sender}@{src.name} → {recipient}@{dst.name}\n"
                       "(numbered as the steps in architecture.md)"),
        (OTHER, "-", "the same services, used the other way round"),
        (LOOKUP, "--", "a DNS question"),
    ]:
        ax.plot([x, x + 0.5], [y, y], color=colour, lw=2, linestyle=style)
        ax.text(x + 0.65, y, text, va="center", fontsize=9, linespacing=1.3)
        y -= 0.6
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write into")
    parser.add_argument("--config", help="lab TOML file (default: the default lab)")
    args = parser.parse_args(argv)
    fig = build_figure(LabConfig.load(args.config))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, dpi in [("architecture.svg", None), ("architecture.png", 150)]:
        fig.savefig(args.out / name, dpi=dpi, facecolor="white")
        print(args.out / name)
    plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
