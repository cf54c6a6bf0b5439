"""First-person frames of a simulated episode, drawn with numpy alone.

What makes real egocentric video hard is put in on purpose: the head shakes and drifts (random
translation and rotation per frame), the light changes (global brightness and colour drift, now
and then a step as if a lamp were switched), hands occlude the work, objects that do not matter
lie at the border, and the sensor adds noise. The cue that the assistant must react to (an item
appearing at its slot with the hand released beside it) stays visible through all of it.

The scene is drawn on a canvas larger than the frame (a margin for the shake), then resampled.
Every frame can be rendered on its own, in any order, with the same result.
"""

from __future__ import annotations

import math

import numpy as np

from proassist_edge.taskworld.world import FAMILY_ITEMS, FrameState, Timeline

Canvas = np.ndarray  # float32 (C, C, 3), values 0..255

_TABLES = ((150, 105, 65), (118, 84, 56), (172, 138, 98), (108, 108, 114), (186, 176, 160))
_SKINS = ((226, 178, 146), (200, 140, 104), (150, 96, 66), (238, 196, 168), (112, 74, 54))
_SLEEVES = ((40, 50, 90), (150, 30, 30), (60, 60, 60), (200, 200, 205), (30, 100, 70))
_VESSELS = {  # rim, inside
    "salad": ((206, 168, 122), (118, 78, 46)),
    "soup": ((176, 176, 182), (92, 94, 100)),
    "stir_fry": ((48, 48, 52), (74, 72, 76)),
}


def _span(a: float, b: float, n: int) -> tuple[int, int, np.ndarray]:
    # Pixel range covering [a, b) and each pixel's coverage: anti-aliased edges for free.
    i0, i1 = max(int(math.floor(a)), 0), min(int(math.ceil(b)), n)
    if i1 <= i0:
        return 0, 0, np.zeros(0, np.float32)
    idx = np.arange(i0, i1, dtype=np.float32)
    cov = np.clip(np.minimum(b, idx + 1) - np.maximum(a, idx), 0.0, 1.0)
    return i0, i1, cov


def _blend(cv: Canvas, r0: int, c0: int, alpha: np.ndarray, rgb: tuple[float, ...]) -> None:
    sub = cv[r0 : r0 + alpha.shape[0], c0 : c0 + alpha.shape[1]]
    sub += alpha[..., None] * (np.asarray(rgb, np.float32) - sub)


def rect(cv: Canvas, x0: float, y0: float, x1: float, y1: float, rgb: tuple[float, ...],
         alpha: float = 1.0) -> None:
    """Fill an axis-aligned rectangle given in canvas pixels."""
    c0, c1, cx = _span(x0, x1, cv.shape[1])
    r0, r1, cy = _span(y0, y1, cv.shape[0])
    if c1 > c0 and r1 > r0:
        _blend(cv, r0, c0, alpha * np.outer(cy, cx), rgb)


def capsule(cv: Canvas, p: tuple[float, float], q: tuple[float, float], r: float,
            rgb: tuple[float, ...], alpha: float = 1.0) -> None:
    """Fill every pixel within r of the segment p-q (a disc when p == q), in canvas pixels."""
    capsules(cv, [(p, q, r)], rgb, alpha)


Segment = tuple[tuple[float, float], tuple[float, float], float]


def capsules(cv: Canvas, segs: list[Segment], rgb: tuple[float, ...], alpha: float = 1.0) -> None:
    """Fill the union of several capsules (p, q, r) in one pass: one colour, one blend."""
    h, w = cv.shape[:2]
    c0 = max(int(min(min(p[0], q[0]) - r for p, q, r in segs) - 1), 0)
    c1 = min(int(max(max(p[0], q[0]) + r for p, q, r in segs) + 2), w)
    r0 = max(int(min(min(p[1], q[1]) - r for p, q, r in segs) - 1), 0)
    r1 = min(int(max(max(p[1], q[1]) + r for p, q, r in segs) + 2), h)
    if c1 <= c0 or r1 <= r0:
        return
    seg = np.asarray([(p[0], p[1], q[0] - p[0], q[1] - p[1], r) for p, q, r in segs],
                     np.float32)[:, :, None, None]
    px, py, dx, dy, rad = seg[:, 0], seg[:, 1], seg[:, 2], seg[:, 3], seg[:, 4]
    xs = np.arange(c0, c1, dtype=np.float32)[None, None, :] + 0.5 - px
    ys = np.arange(r0, r1, dtype=np.float32)[None, :, None] + 0.5 - py
    t = np.clip((xs * dx + ys * dy) / np.maximum(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
    d = np.sqrt((xs - t * dx) ** 2 + (ys - t * dy) ** 2) - rad
    _blend(cv, r0, c0, alpha * np.clip(0.5 - d.min(axis=0), 0.0, 1.0), rgb)


def _upsample(grid: np.ndarray, n: int) -> np.ndarray:
    # Bilinear upsampling as two small matrix products: smooth low-frequency noise fields.
    g = grid.shape[0]
    pos = np.linspace(0, g - 1, n)
    i0 = np.minimum(np.floor(pos).astype(int), g - 2)
    f = pos - i0
    a = np.zeros((n, g))
    a[np.arange(n), i0] = 1 - f
    a[np.arange(n), i0 + 1] = f
    return (a @ grid @ a.T).astype(np.float32)


class Scene:
    """Everything about how one episode looks; `render(i)` draws frame i."""

    def __init__(self, timeline: Timeline, seed: int, size: int = 64) -> None:
        self.tl, self.seed, self.size = timeline, seed, size
        rng = np.random.default_rng([seed, 1])
        self.margin = max(4, round(0.1 * size))
        self.c = size + 2 * self.margin
        self.skin = _jitter(rng, _SKINS[int(rng.integers(len(_SKINS)))], 10)
        self.sleeve = _jitter(rng, _SLEEVES[int(rng.integers(len(_SLEEVES)))], 15)
        s = timeline.handedness
        self.anchor = (0.5 + s * float(rng.uniform(0.45, 0.65)), 1.5)
        self.piles = {k: _pile(rng) for k in FAMILY_ITEMS[timeline.spec.variant.family]}
        self.bg = self._background(rng)
        self.n_distractors = int(rng.integers(1, 5))
        for _ in range(self.n_distractors):
            self._distractor(rng)
        self.gain, self.brightness = _lighting(rng, timeline.num_frames)
        self.shake = _shake(rng, timeline.num_frames, size / 64.0, self.margin)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        rr = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (size * size / 2)
        self.vignette = (1.0 - np.float32(rng.uniform(0.05, 0.25)) * rr)[..., None]
        self.noise = float(rng.uniform(1.5, 4.5))
        self._noise_bank = rng.standard_normal((2, size + 16, size + 16, 3), np.float32)
        self._noise_bank *= np.float32(self.noise)
        self._noise_at = rng.integers(0, 17, size=(timeline.num_frames, 3)) % [17, 17, 2]
        self._u, self._v = xx - (size - 1) / 2, yy - (size - 1) / 2
        self._layers: dict[tuple[tuple[int, str], ...], Canvas] = {}
        self._hand_box = int(math.ceil(0.2 * size))
        self._sprite_box = int(math.ceil(0.25 * size))
        self._sprites: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._palm_mask, self._finger_mask = self._hand_masks()

    # -- coordinates ------------------------------------------------------------------------
    def px(self, x: float, y: float) -> tuple[float, float]:
        return self.margin + x * self.size, self.margin + y * self.size

    # -- static layers ----------------------------------------------------------------------
    def _background(self, rng: np.random.Generator) -> Canvas:
        c = self.c
        base = np.asarray(_jitter(rng, _TABLES[int(rng.integers(len(_TABLES)))], 12), np.float32)
        field = _upsample(rng.normal(size=(6, 6)), c) * 10
        rows = np.linspace(0, 1, c, dtype=np.float32)[:, None]
        grain = 5 * np.sin(2 * np.pi * (rows * rng.uniform(6, 14) + 0.05 * field))
        cv = np.broadcast_to(base, (c, c, 3)) + (field + grain)[..., None]
        cv = np.ascontiguousarray(cv, dtype=np.float32)
        v = self.tl.spec.variant
        if v.family == "recipe":
            rim, inside = _VESSELS[v.key]
            cx, cy = self.px(0.5, 0.55)
            if v.key == "stir_fry":  # the pan's handle points away from the working hand
                hx, _ = self.px(0.5 - self.tl.handedness * 0.5, 0.55)
                capsule(cv, (cx, cy), (hx, cy), 0.045 * self.size, (30, 30, 32))
            capsule(cv, (cx + 1.5, cy + 2), (cx + 1.5, cy + 2), 0.28 * self.size, (0, 0, 0), 0.3)
            capsule(cv, (cx, cy), (cx, cy), 0.275 * self.size, _jitter(rng, rim, 8))
            capsule(cv, (cx, cy), (cx, cy), 0.24 * self.size, _jitter(rng, inside, 8))
            capsule(cv, (cx - 2, cy - 2), (cx - 2, cy - 2), 0.14 * self.size, (255, 255, 255), 0.06)
        else:
            xs = [p[0] for p in v.slots[: len(self.tl.spec.items)]]
            ys = [p[1] for p in v.slots[: len(self.tl.spec.items)]]
            w, h = v.piece
            pad = 0.05
            x0, y0 = self.px(min(xs) - w / 2 - pad, min(ys) - h / 2 - pad)
            x1, y1 = self.px(max(xs) + w / 2 + pad, max(ys) + h / 2 + pad)
            if v.key == "tower":  # a tower stands on a base plate under its first block
                x0, y0 = self.px(0.5 - w / 2 - pad, v.slots[0][1] + h / 2)
                x1, y1 = self.px(0.5 + w / 2 + pad, v.slots[0][1] + h / 2 + 0.06)
            grey = float(rng.uniform(105, 150))
            rect(cv, x0 + 2, y0 + 3, x1 + 2, y1 + 3, (0, 0, 0), 0.3)
            rect(cv, x0, y0, x1, y1, (grey, grey, grey + 6))
            if v.key != "tower":  # faint marks where the pieces go, as real plates have
                for k in range(len(self.tl.spec.items)):
                    sx, sy = self.px(*v.slots[k])
                    hw, hh = w * self.size / 2, h * self.size / 2
                    rect(cv, sx - hw, sy - hh, sx + hw, sy + hh, (0, 0, 0), 0.12)
        return cv

    def _distractor(self, rng: np.random.Generator) -> None:
        # Objects that don't matter, at the border, away from the work area.
        side = int(rng.integers(3))
        x, y = [(rng.uniform(-0.05, 1.05), rng.uniform(-0.05, 0.16)),
                (rng.uniform(-0.08, 0.1), rng.uniform(0.0, 1.0)),
                (rng.uniform(0.9, 1.08), rng.uniform(0.0, 0.75))][side]
        cx, cy = self.px(float(x), float(y))
        s, kind = self.size, int(rng.integers(4))
        col = tuple(float(c) for c in rng.integers(20, 240, size=3))
        if kind == 0:  # mug seen from above
            capsule(self.bg, (cx, cy), (cx, cy), 0.08 * s, col)
            capsule(self.bg, (cx, cy), (cx, cy), 0.055 * s, (40, 30, 25))
        elif kind == 1:  # phone
            w, h = 0.07 * s, 0.13 * s
            rect(self.bg, cx - w, cy - h, cx + w, cy + h, (25, 25, 30))
            rect(self.bg, cx - w + 1, cy - h + 1, cx + w - 1, cy + h - 1, (60, 80, 110), 0.5)
        elif kind == 2:  # pen
            ang = rng.uniform(0, np.pi)
            d = 0.12 * s
            q = (cx + d * math.cos(ang), cy + d * math.sin(ang))
            capsule(self.bg, (cx, cy), q, 0.012 * s + 0.4, col)
        else:  # a spare piece of some colour: looks like task items, never used
            w = 0.06 * s
            rect(self.bg, cx - w, cy - w, cx + w, cy + w, col)

    def _layer(self, placed: tuple[tuple[int, str], ...]) -> Canvas:
        # Placed items change a few times per episode: cache one canvas per configuration.
        layer = self._layers.get(placed)
        if layer is None:
            layer = self.bg.copy()
            for slot, key in placed:
                self._item(layer, key, self.tl.spec.variant.slots[slot], lifted=False)
            self._layers[placed] = layer
        return layer

    # -- dynamic parts ----------------------------------------------------------------------
    def _item(self, cv: Canvas, key: str, at: tuple[float, float], lifted: bool) -> None:
        item = self.tl.spec.item(key)
        cx, cy = self.px(*at)
        sh = (0.03, 0.05) if lifted else (0.012, 0.02)  # a lifted item casts a longer shadow
        s = self.size
        if self.tl.spec.variant.family == "recipe":
            capsule(cv, (cx + sh[0] * s, cy + sh[1] * s), (cx + sh[0] * s, cy + sh[1] * s),
                    0.07 * s, (0, 0, 0), 0.25)
            for shade, dots in self.piles[key]:  # two shades of pieces make a heap
                rgb = tuple(min(255.0, c * shade) for c in item.rgb)
                capsules(cv, [((cx + dx * s, cy + dy * s), (cx + dx * s, cy + dy * s), r * s)
                              for dx, dy, r in dots], rgb)
            return
        w, h = (self.tl.spec.variant.piece[0] * s / 2, self.tl.spec.variant.piece[1] * s / 2)
        rect(cv, cx - w + sh[0] * s, cy - h + sh[1] * s, cx + w + sh[0] * s, cy + h + sh[1] * s,
             (0, 0, 0), 0.3)
        rect(cv, cx - w, cy - h, cx + w, cy + h, item.rgb)
        light = tuple(c + 0.4 * (255 - c) for c in item.rgb)
        rect(cv, cx - w, cy - h, cx + w, cy - h + 0.5 * h, light, 0.5)
        rect(cv, cx - w, cy + 0.6 * h, cx + w, cy + h, (0, 0, 0), 0.25)

    def _hand_masks(self) -> tuple[np.ndarray, np.ndarray]:
        # Palm and fingers have a fixed shape: draw their coverage once, blit it every frame.
        s, side, b = self.size, self.tl.handedness, self._hand_box
        o = (b + 0.5, b + 0.5)  # the palm centre inside the mask
        palm = np.zeros((2 * b + 1, 2 * b + 1, 3), np.float32)
        capsule(palm, o, o, 0.1 * s, (1.0, 1.0, 1.0))
        # Fingers reach over the lower edge of a held item: it stays recognisable in the hand.
        segs: list[Segment] = [
            ((o[0] + side * dx * 0.6 * s, o[1]), (o[0] + side * dx * s, o[1] - 0.09 * s), 0.025 * s)
            for dx in (-0.06, -0.02, 0.02, 0.06)
        ]
        segs.append((o, (o[0] - side * 0.11 * s, o[1] - 0.03 * s), 0.027 * s))  # thumb
        fingers = np.zeros_like(palm)
        capsules(fingers, segs, (1.0, 1.0, 1.0))
        return palm[..., 0].copy(), fingers[..., 0].copy()

    def _blit(self, cv: Canvas, mask: np.ndarray, at: tuple[float, float]) -> None:
        b = self._hand_box
        x0, y0 = int(math.floor(at[0])) - b, int(math.floor(at[1])) - b
        c0, r0 = max(x0, 0), max(y0, 0)
        c1, r1 = min(x0 + mask.shape[1], self.c), min(y0 + mask.shape[0], self.c)
        if c1 > c0 and r1 > r0:
            _blend(cv, r0, c0, mask[r0 - y0 : r1 - y0, c0 - x0 : c1 - x0], self.skin)

    def _hand(self, cv: Canvas, state: FrameState) -> None:
        hx, hy = state.hand
        palm = self.px(hx + self.tl.handedness * 0.03, hy + 0.12)
        anchor = self.px(*self.anchor)
        wrist = (palm[0] + 0.4 * (anchor[0] - palm[0]), palm[1] + 0.4 * (anchor[1] - palm[1]))
        capsule(cv, palm, wrist, 0.08 * self.size, tuple(0.9 * c for c in self.skin))
        capsule(cv, wrist, anchor, 0.1 * self.size, self.sleeve)
        self._blit(cv, self._palm_mask, palm)
        if state.held is not None:
            self._held(cv, state.held, self.px(hx, hy))
        self._blit(cv, self._finger_mask, palm)

    def _held(self, cv: Canvas, key: str, at: tuple[float, float]) -> None:
        # A held item is drawn every frame: use a sprite made once. Every blend is affine in
        # the pixel below, so drawing on black (B) and on white (W) gives out = A * below + B
        # with A = (W - B) / 255, exactly what drawing in place would give.
        sprite = self._sprites.get(key)
        b = self._sprite_box
        if sprite is None:
            black = np.zeros((2 * b + 1, 2 * b + 1, 3), np.float32)
            white = np.full_like(black, 255.0)
            centre = ((b + 0.5 - self.margin) / self.size, (b + 0.5 - self.margin) / self.size)
            self._item(black, key, centre, lifted=True)
            self._item(white, key, centre, lifted=True)
            sprite = self._sprites[key] = ((white - black) / 255.0, black)
        x0, y0 = int(math.floor(at[0])) - b, int(math.floor(at[1])) - b
        c0, r0 = max(x0, 0), max(y0, 0)
        c1, r1 = min(x0 + 2 * b + 1, self.c), min(y0 + 2 * b + 1, self.c)
        if c1 > c0 and r1 > r0:
            a, add = (s[r0 - y0 : r1 - y0, c0 - x0 : c1 - x0] for s in sprite)
            sub = cv[r0:r1, c0:c1]
            sub *= a
            sub += add

    def _warp(self, cv: Canvas, i: int) -> np.ndarray:
        # Camera motion: rotate + translate the sampling grid, bilinear lookup in the canvas.
        dx, dy, th = (float(v) for v in self.shake[i])
        c, s = np.float32(math.cos(th)), np.float32(math.sin(th))
        centre = self.margin + (self.size - 1) / 2
        hi = self.c - 1.001
        sx = np.clip(c * self._u - s * self._v + np.float32(centre + dx), 0, hi).ravel()
        sy = np.clip(s * self._u + c * self._v + np.float32(centre + dy), 0, hi).ravel()
        x0, y0 = sx.astype(np.int32), sy.astype(np.int32)
        fx = (sx - x0.astype(np.float32))[:, None]
        fy = (sy - y0.astype(np.float32))[:, None]
        flat = cv.reshape(-1, 3)
        i00 = y0 * self.c + x0
        # np.take is several times faster than fancy indexing on rows.
        a, b = np.take(flat, i00, axis=0), np.take(flat, i00 + 1, axis=0)
        top = a + (b - a) * fx
        a, b = np.take(flat, i00 + self.c, axis=0), np.take(flat, i00 + self.c + 1, axis=0)
        bot = a + (b - a) * fx
        out: np.ndarray = (top + (bot - top) * fy).reshape(self.size, self.size, 3)
        return out

    def render(self, i: int) -> np.ndarray:
        """Frame i as uint8 RGB (size, size, 3)."""
        state = self.tl.states[i]
        cv = self._layer(state.placed).copy()
        # Skip a hand resting below everything the camera can see (fingertips are its top).
        if state.hand[1] - 0.01 < 1 + self.margin / self.size or state.held is not None:
            self._hand(cv, state)
        img = self._warp(cv, i)
        img *= self.gain[i] * self.vignette
        # Sensor noise: a per-frame window into a noise bank, the same in any rendering order.
        oy, ox, k = self._noise_at[i]
        img += self._noise_bank[k, oy : oy + self.size, ox : ox + self.size]
        return np.clip(img, 0, 255).astype(np.uint8)

    def render_all(self) -> np.ndarray:
        return np.stack([self.render(i) for i in range(self.tl.num_frames)])


def _jitter(rng: np.random.Generator, rgb: tuple[int, ...], amount: float) -> tuple[float, ...]:
    return tuple(float(np.clip(c + rng.uniform(-amount, amount), 0, 255)) for c in rgb)


def _pile(rng: np.random.Generator) -> list[tuple[float, list[tuple[float, float, float]]]]:
    # An ingredient is a small heap of pieces in two shades: (shade, [(dx, dy, radius)]).
    out = []
    for shade in (rng.uniform(0.78, 0.9), rng.uniform(0.98, 1.1)):
        dots = []
        for _ in range(int(rng.integers(4, 6))):
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.045)
            dots.append((float(d * math.cos(a)), float(d * math.sin(a)),
                         float(rng.uniform(0.024, 0.032))))
        out.append((float(shade), dots))
    return out


def _lighting(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame RGB gain (n, 3): slow brightness wave, maybe a lamp switched, colour drift."""
    t = np.arange(n, dtype=np.float32)
    period, phase = rng.uniform(30, 120), rng.uniform(0, 7)
    b = 1 + rng.uniform(0.04, 0.15) * np.sin(2 * np.pi * t / period + phase)
    b += rng.normal(0, 0.012, n)  # flicker
    if rng.random() < 0.35:
        at, step = int(rng.integers(0, n)), rng.choice([-1, 1]) * rng.uniform(0.1, 0.2)
        b += step * np.clip((t - at + 1) / 2, 0, 1)
    b = np.clip(b * rng.uniform(0.85, 1.1), 0.6, 1.4)
    tint = 1 + rng.uniform(-0.05, 0.05, 3)[None, :] + rng.uniform(0, 0.06, 3)[None, :] * np.sin(
        2 * np.pi * t[:, None] / rng.uniform(40, 160) + rng.uniform(0, 7, 3)[None, :])
    return (b[:, None] * tint).astype(np.float32), b.astype(np.float32)


def _shake(rng: np.random.Generator, n: int, scale: float, margin: int) -> np.ndarray:
    """Per-frame camera offset (dx, dy px, rotation rad): slow head drift plus jitter."""
    amp = rng.uniform(0.5, 1.0)
    kicks = rng.normal(0, [0.5 * scale, 0.5 * scale, 0.004], size=(n, 3))
    jitter = rng.normal(0, [0.5 * amp * scale, 0.5 * amp * scale, 0.006 * amp], size=(n, 3))
    drift = np.zeros((n, 3))
    for i in range(n):  # the head drifts and is pulled back towards the work (AR(1))
        drift[i] = kicks[i] + (0.85 * drift[i - 1] if i else 0.0)
    lim = margin - 2.5 * scale
    return np.clip(drift + jitter, [-lim, -lim, -0.04], [lim, lim, 0.04]).astype(np.float32)
