"""The scale searches of GGML's reference K-quant quantizers, vectorized over sub-blocks in torch.

Each function works on sub-blocks laid out element-major, x [n, S]: row i holds element i of
all S sub-blocks, so the reference's per-element loops become one contiguous tensor op per
element. Sums run element by element in float32 (seq_sum), the order of the C loops, and the
products keep the C operand order: the comparisons that pick a candidate then see the same
floats as the reference, which keeps the output byte-identical to it.
Rounding is nearest_int, ggml's own, bit for bit. csrc/cpu/quantize.cpp runs the same searches
compiled (one sub-block per SIMD lane), with the same bytes, for tensors on the CPU.
"""

import torch

# Sub-blocks whose largest magnitude is below this are all-zero to the reference.
GROUP_MAX_EPS = 1e-15


def seq_sum(t):
    """t [n, S] summed over dim 0 one row at a time, in float32: the C loop's rounding."""
    total = t[0].clone()
    for i in range(1, t.shape[0]):
        total += t[i]
    return total


def nearest_int(t):
    """GGML's nearest_int of float32 t, as int32: half to even through the 1.5*2^23 trick, bit for
    bit, including what it gives for |t| past 2^22, Inf and NaN (which the searches meet where a
    span of denormals overflows an iscale; the callers clamp)."""
    bits = (t + 12582912.0).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def f32(value):
    """A Python float rounded to float32, as a C float constant expression evaluates."""
    return torch.tensor(value, dtype=torch.float32).item()


def sqrt(t):
    """Correctly rounded float32 square root, as C's sqrtf (torch's CPU float32 sqrt can be
    one ulp off); a float64 root rounded once to float32 is exact."""
    if t.device.type == "mps":  # no float64 there
        return t.sqrt()
    return t.double().sqrt().float()


def rdiv(value, t):
    """value / t elementwise, one correctly rounded float32 division (torch computes
    `number / tensor` as reciprocal(t) * number, two roundings)."""
    return t.new_tensor(value) / t


def positive_max(v):
    """max(0, v's largest entry) per row of v [B, n], +0 when none is positive (as the
    reference's running maximum from 0 gives; clamp would keep a -0 and flip dmin's sign bit)."""
    top = v.amax(dim=1)
    return torch.where(top > 0, top, torch.zeros_like(top))


def first_absmax(x):
    """The signed value of largest magnitude per column of x [n, S], the first one on ties
    (0 for an all-zero column): the reference's running maximum, one contiguous row at a time."""
    amax = torch.zeros_like(x[0])
    peak = torch.zeros_like(x[0])
    for row in x:
        magnitude = row.abs()
        larger = magnitude > amax
        amax = torch.where(larger, magnitude, amax)
        peak = torch.where(larger, row, peak)
    return peak


def make_qx_quants(x, nmax):
    """Symmetric codes in [0, 2*nmax) and scale per sub-block (make_qx_quants, rmse_type 1,
    weights x^2): 19 grids around iscale = -nmax/max, each least-squares fitted.

    x [n, S] -> (scale [S], L uint8 [n, S]).
    """
    peak = first_absmax(x)
    zero = peak.abs() < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)
    w = x * x
    wx = w * x

    def fit(iscale):
        l = nearest_int(iscale * x).clamp_(-nmax, nmax - 1).float()
        return l, seq_sum(wx * l), seq_sum(w * l * l)

    l, sumlx, suml2 = fit(rdiv(-nmax, peak))
    best_l = l
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(suml2))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = fit(rdiv(-f32(nmax + f32(f32(0.1) * step)), peak))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_l = torch.where(better, l, best_l)
        scale = torch.where(better, sumlx / torch.where(better, suml2, torch.ones_like(suml2)), scale)
        best = torch.where(better, scale * sumlx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    codes = torch.where(zero, torch.zeros_like(best_l), best_l + nmax)
    return scale, codes.to(torch.uint8)


def make_q3_quants(x, nmax):
    """Symmetric codes in [0, 2*nmax) and scale per sub-block (make_q3_quants with do_rmse):
    codes from iscale = -nmax/max, then up to 5 passes of per-code refinement, weights x^2.

    The passes visit the codes in order, each seeing the sums the previous ones left, so the
    loop runs element by element over all sub-blocks at once. x [n, S] -> (scale [S], L uint8 [n, S]).
    """
    peak = first_absmax(x)
    zero = peak.abs() < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)
    w = x * x
    wx = w * x
    codes = nearest_int(rdiv(-nmax, peak) * x).clamp_(-nmax, nmax - 1).float()
    sumlx = seq_sum(wx * codes)
    suml2 = seq_sum(w * codes * codes)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            li, wi, wxi = codes[i], w[i], wx[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            positive = slx > 0
            new_l = nearest_int(x[i] * sl2 / torch.where(positive, slx, torch.ones_like(slx)))
            new_l = new_l.clamp_(-nmax, nmax - 1).float()
            slx = slx + wxi * new_l
            sl2 = sl2 + wi * new_l * new_l
            take = positive & (new_l != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            codes[i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
            changed |= take
        # A pass that changes nothing leaves the state as it was, so later ones would too.
        if not bool(changed.any()):
            break
    ok = suml2 > 0
    scale = torch.where(ok, sumlx / torch.where(ok, suml2, torch.ones_like(suml2)), torch.zeros_like(suml2))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    codes = torch.where(zero, torch.zeros_like(codes), codes + nmax)
    return scale, codes.to(torch.uint8)


def make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad):
    """Asymmetric codes in [0, nmax], scale and -min per sub-block (make_qkx2_quants): the
    grids iscale = (nmax + rmin + rdelta*i) / (max - min), i = 0..nstep, each laid from the
    best min so far and fitted by weighted 2x2 least squares; the lowest weighted squared
    (or, with use_mad, absolute) error wins.

    x, weights [n, S] -> (scale [S], -min [S], L uint8 [n, S]).
    """
    low = x.amin(dim=0).clamp(max=0)
    high = x.amax(dim=0)
    flat = high == low
    sum_w = seq_sum(weights)
    sum_x = seq_sum(weights * x)

    def error(scale, low, l):
        diff = scale * l + low - x
        return seq_sum(weights * (diff.abs() if use_mad else diff * diff))

    def codes(iscale, low):
        return nearest_int(iscale * (x - low)).clamp_(0, nmax).float()

    span = torch.where(flat, torch.ones_like(high), high - low)
    iscale = rdiv(nmax, span)
    scale = 1 / iscale
    best_l = codes(iscale, low)
    best_err = error(scale, low, best_l)
    for step in range(nstep + 1):
        factor = f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax)
        iscale = rdiv(factor, torch.where(flat, torch.ones_like(high), high - low))
        l = codes(iscale, low)
        wl = weights * l
        sum_l = seq_sum(wl)
        sum_l2 = seq_sum(wl * l)
        sum_xl = seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        fit_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        fit_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        # A positive min is not representable (mins are subtracted): refit the scale alone.
        positive = fit_min > 0
        fit_scale = torch.where(positive, sum_xl / torch.where(positive, sum_l2, torch.ones_like(sum_l2)), fit_scale)
        fit_min = torch.where(positive, torch.zeros_like(fit_min), fit_min)
        err = error(fit_scale, fit_min, l)
        better = ok & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_l = torch.where(better, l, best_l)
        scale = torch.where(better, fit_scale, scale)
        low = torch.where(better, fit_min, low)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    best_l = torch.where(flat, torch.zeros_like(best_l), best_l)
    return scale, -low, best_l.to(torch.uint8)


def c_uint8(v):
    """Integers in a float tensor as C stores an int in a uint8_t (modulo 256), as int32."""
    return v.to(torch.int32) & 255
