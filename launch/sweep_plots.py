"""The sweep report's charts, drawn with PIL (matplotlib is not installed): a generic line/marker
chart with axes, ticks and a legend, and the two plots launch/sweep_report.py writes (train loss
against step, and a swept field's value against the ranking metric).
"""

import math

from PIL import Image, ImageDraw, ImageFont

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size):
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font.
    return ImageFont.load_default()


def _wide(values) -> bool:
  return bool(values) and min(values) > 0 and max(values) / min(values) >= 10


def _limits(values, log):
  if not values:
    return (1.0, 10.0) if log else (0.0, 1.0)
  lo, hi = min(values), max(values)
  if log:
    pad = (hi / lo) ** 0.05 if hi > lo else 1.5
    return lo / pad, hi * pad
  pad = (hi - lo) * 0.05 if hi > lo else (abs(hi) * 0.1 or 1.0)
  return lo - pad, hi + pad


def _ticks(lo, hi, log):
  if log:
    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mantissas in ((1,), (1, 2, 5), range(1, 10)):
      ticks = [t for e in range(e0, e1 + 1) for t in (m * 10.0 ** e for m in mantissas)
               if lo <= t <= hi]
      if len(ticks) >= 3:
        return ticks[::max(1, len(ticks) // 8)]
  raw = (hi - lo) / 5
  mag = 10 ** math.floor(math.log10(raw))
  step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
  return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _num(v) -> str:
  text = f'{v:.4g}'
  return '0' if text == '-0' else text


def _scale(lim, log, p0, p1):
  """Data -> pixels along one axis, linear or log10."""
  f = math.log10 if log else float
  a, b = f(lim[0]), f(lim[1])
  return lambda v: p0 + (f(v) - a) / ((b - a) or 1) * (p1 - p0)


def chart(path, title, xlabel, ylabel, series, *, categories=None, xlog=False, ylog=False,
          xspan=(), note='', annotate=None, size=(960, 540)):
  """A PNG of `series` ([(label, [(x, y[, filled]), ...])], one colour each) with axes and a
  legend below. `categories`: x is an index into these tick labels. `annotate(y)`: text beside
  each marker. A point with `filled` False gets a hollow marker. `xspan`: x values the axis covers
  even without a point there.
  """
  font, small = _font(14), _font(12)
  width, height = size
  left, right, top, bottom = 80, 24, 56, 52
  per_entry = max([int(small.getlength(s[0])) + 36 for s in series] or [0])
  cols = max(1, (width - 40) // max(per_entry, 1))
  legend_h = math.ceil(len(series) / cols) * 20 + 8
  img = Image.new('RGB', (width, height + legend_h), 'white')
  draw = ImageDraw.Draw(img)
  x0, x1, y0, y1 = left, width - right, height - bottom, top  # y1 is the top (pixels go down).
  xs = [p[0] for _, pts in series for p in pts] + list(xspan)
  ys = [p[1] for _, pts in series for p in pts]
  xlim = (-0.5, len(categories) - 0.5) if categories else _limits(xs, xlog)
  ylim = _limits(ys, ylog)
  sx, sy = _scale(xlim, xlog, x0, x1), _scale(ylim, ylog, y0, y1)
  for t in _ticks(*ylim, ylog):
    draw.line([(x0, sy(t)), (x1, sy(t))], fill=(232, 232, 232))
    draw.text((x0 - 6, sy(t)), _num(t), fill='black', font=small, anchor='rm')
  xticks = (list(enumerate(categories)) if categories
            else [(t, _num(t)) for t in _ticks(*xlim, xlog)])
  slot = (x1 - x0) / max(len(xticks), 1)
  for t, text in xticks:
    while small.getlength(text) > slot - 4 and len(text) > 4:
      text = text[:-2] + '…'
    draw.line([(sx(t), y0), (sx(t), y0 + 4)], fill='black')
    draw.text((sx(t), y0 + 7), text, fill='black', font=small, anchor='mt')
  draw.rectangle([x0, y1, x1, y0], outline='black')
  draw.text((width / 2, 12), title, fill='black', font=font, anchor='mt')
  if note:
    draw.text((width / 2, 32), note, fill=(110, 110, 110), font=small, anchor='mt')
  draw.text(((x0 + x1) / 2, height - 18), xlabel, fill='black', font=font, anchor='mm')
  ytext = Image.new('RGB', (int(font.getlength(ylabel)) + 4, 20), 'white')
  ImageDraw.Draw(ytext).text((2, 2), ylabel, fill='black', font=font)
  ytext = ytext.rotate(90, expand=True)
  img.paste(ytext, (6, int((y0 + y1 - ytext.height) / 2)))
  if not ys:
    draw.text(((x0 + x1) / 2, (y0 + y1) / 2), 'nothing logged yet', fill='gray', font=font,
              anchor='mm')
  for i, (name, pts) in enumerate(series):
    colour = _PALETTE[i % len(_PALETTE)]
    xy = [(sx(p[0]), sy(p[1])) for p in pts]
    if len(xy) > 1:
      draw.line(xy, fill=colour, width=2, joint='curve')
    if len(xy) <= 30 or annotate:
      for (px, py), p in zip(xy, pts):
        filled = len(p) < 3 or p[2]
        draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=colour if filled else 'white',
                     outline=colour, width=2)
        if annotate:
          draw.text((px + 8, py - 6), annotate(p[1]), fill=colour, font=small, anchor='ls')
    lx, ly = 20 + (i % cols) * per_entry, height + 4 + (i // cols) * 20
    draw.rectangle([lx, ly + 4, lx + 22, ly + 12], fill=colour)
    draw.text((lx + 28, ly + 8), name, fill='black', font=small, anchor='lm')
  img.save(path)


def smooth(points: list, fraction: float = 0.03) -> list:
  """(step, value) points averaged over a trailing window of `fraction` of them (at least 1), as
  TensorBoard smooths: per-step losses are too noisy to tell members apart."""
  k = max(1, int(len(points) * fraction))
  out, total = [], 0.0
  for i, (step, y) in enumerate(points):
    total += y - (points[i - k][1] if i >= k else 0.0)
    out.append((step, total / min(i + 1, k)))
  return out


def plot_loss(path: str, sweep) -> None:
  """Each member's train loss against step, smoothed (`sweep`: a launch.sweep_report.Sweep)."""
  series = [(m.name, smooth(m.losses)) for m in sweep.members if m.losses]
  ys = [y for _, pts in series for _, y in pts]
  missing = len(sweep.members) - len(series)
  k = max(1, int(max((len(p) for _, p in series), default=0) * 0.03))
  title = 'train loss' + (f' (mean of {k} logged steps)' if k > 1 else '')
  chart(path, title, 'step', 'train/loss' + (' (log)' if _wide(ys) else ''), series,
        ylog=_wide(ys), note=f'{missing} of {len(sweep.members)} members logged no loss yet'
        if missing else '')


def _float(v):
  try:
    return float(v)
  except ValueError:
    return None


def plot_field(path: str, sweep, field: str, metric: str, *, words: str, short: dict,
               lower: bool) -> None:
  """The field's value against `metric` (`words`: its name on the chart), members with the same
  other fields joined (`short`: a field's name in the legend). `lower`: lower is better, so the
  metric is a loss and gets a log axis when it spans 10x.
  """
  values = list(dict.fromkeys(m.overrides[field] for m in sweep.members if field in m.overrides))
  numeric = all(_float(v) is not None for v in values)
  categories = None if numeric else values
  groups = {}
  for m in sweep.members:
    y = m.value(metric)
    if field in m.overrides and y is not None:
      key = ', '.join(f'{short[f]}={m.overrides.get(f, "?")}' for f in sweep.fields if f != field)
      x = float(m.overrides[field]) if numeric else values.index(m.overrides[field])
      groups.setdefault(key or words, []).append(
          (x, y * 100 if _pct(metric) else y, m.status == 'done'))
  series = [(k, sorted(pts)) for k, pts in groups.items()]
  ys = [p[1] for _, pts in series for p in pts]
  plotted = sum(len(p) for _, p in series)
  notes = ['hollow: not done'] if any(not p[2] for _, pts in series for p in pts) else []
  if plotted < len(sweep.members):
    notes.append(f'{len(sweep.members) - plotted} of {len(sweep.members)} members have no '
                 f'{words} yet')
  xs = [float(v) for v in values] if numeric else []
  ylog = lower and _wide(ys)
  chart(path, f'{words} vs {field}', field + (' (log)' if numeric and _wide(xs) else ''),
        words + (' %' if _pct(metric) else '') + (' (log)' if ylog else ''), series,
        categories=categories, xlog=numeric and _wide(xs), ylog=ylog, xspan=xs,
        annotate=(lambda y: f'{y:.1f}') if _pct(metric) else _num, note='; '.join(notes))


def _pct(metric: str) -> bool:
  return metric.startswith('eval/')
