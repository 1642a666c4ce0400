"""ResidualVQ: residual vector quantization with EMA codebooks on tinykern's rvq kernels.

The nearest-code search runs in `tinykern.ops.rvq_encode` (no N x K distance matrix) and the
reconstruction from codes in `tinykern.ops.rvq_decode`. Codebook statistics use index_add
(no one-hot), so a step's extra memory is O(N*d + L*K*d).
"""

import torch
import torch.nn.functional as F
from torch import nn

from tinykern import backends, ops


class ResidualVQ(nn.Module):
    """Residual VQ over `num_levels` codebooks of `codebook_size` codes.

    Layout: with `channels_first=False` x is [..., dim]; with `channels_first=True` x is
    [B, dim, *spatial] (NCHW and friends). Codes are always channels-last: [*lead, num_levels]
    where lead is x's shape without the channel dim ([B, H, W, L] for an NCHW input), and
    `decode` returns the layout `forward` takes.

    Quantization runs in fp32 with autocast off; keep the module itself in fp32 (like
    BatchNorm under AMP). In training mode `forward` also k-means-initializes the codebooks on
    its first batch (`kmeans_init`), updates them by EMA (`decay`, Laplace smoothing `eps`),
    restarts codes whose EMA cluster size falls under `dead_code_threshold` (vectors per
    batch; 0 turns restarts off) with residuals drawn from the batch, and with
    `quantize_dropout` keeps only the first l levels of a batch (l uniform in 1..num_levels)
    and marks the dropped codes -1. Eval mode touches no state and gives deterministic codes.

    `forward` returns (quantized, codes, loss): quantized with a straight-through gradient to x,
    and the commitment loss `commitment_weight * mean_l ||z - sum_{j<=l} q_j||^2` over every
    partial sum (RQ-VAE), which is what orders the levels coarse to fine.

    Buffers: `codebooks` [C, K, d], `ema_cluster_size` [C, K], `ema_embed_sum` [C, K, d] and
    `initted`, where C = 1 with `shared_codebook` (one codebook for every level, its statistics
    gathered over all levels) and C = num_levels otherwise. `codebook_dim` d != dim adds Linear
    projections dim -> d before quantization and d -> dim after.
    """

    def __init__(self, dim, codebook_size, num_levels, codebook_dim=None, shared_codebook=False,
                 decay=0.99, commitment_weight=0.25, kmeans_init=True, dead_code_threshold=2.0,
                 quantize_dropout=False, kmeans_iters=10, eps=1e-5, channels_first=False):
        super().__init__()
        backends.preload()  # before any torch.compile of the model (see backends.preload)
        codebook_dim = codebook_dim or dim
        if min(dim, codebook_size, num_levels, codebook_dim) < 1:
            raise ValueError(f"ResidualVQ: dim, codebook_size, num_levels and codebook_dim must be >= 1, got "
                             f"{dim}, {codebook_size}, {num_levels} and {codebook_dim}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_levels = num_levels
        self.codebook_dim = codebook_dim
        self.shared_codebook = shared_codebook
        self.decay = decay
        self.commitment_weight = commitment_weight
        self.dead_code_threshold = dead_code_threshold
        self.quantize_dropout = quantize_dropout
        self.kmeans_iters = kmeans_iters
        self.eps = eps
        self.channels_first = channels_first
        projected = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if projected else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if projected else nn.Identity()

        books = 1 if shared_codebook else num_levels
        # Without k-means the codebooks start random with a cluster size of 1, under the
        # default threshold: the first training step restarts them from batch residuals.
        embed = torch.zeros(books, codebook_size, codebook_dim) if kmeans_init else \
            torch.randn(books, codebook_size, codebook_dim)
        self.register_buffer("codebooks", embed)
        self.register_buffer("ema_cluster_size", torch.ones(books, codebook_size))
        self.register_buffer("ema_embed_sum", embed.clone())
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        # Reading `initted` syncs with the GPU; once it is seen set, Python remembers it.
        self._initted_seen = False
        self.register_load_state_dict_post_hook(ResidualVQ._forget_initted)

    def extra_repr(self):
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, num_levels={self.num_levels}, "
                f"codebook_dim={self.codebook_dim}, shared_codebook={self.shared_codebook}, "
                f"channels_first={self.channels_first}")

    def level_codebooks(self):
        """The codebook of every level, [num_levels, K, d] fp32 (a view when shared)."""
        books = self.codebooks.float()
        return books.expand(self.num_levels, -1, -1) if self.shared_codebook else books

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            lead, rows = self._rows(x)
            z = self.project_in(rows.float())
            train = self.training and z.shape[0] > 0
            if train and not self._initted():
                self._kmeans_init(z.detach())
            levels = self.num_levels
            if train and self.quantize_dropout:
                levels = int(torch.randint(1, self.num_levels + 1, ()))
            books = self.level_codebooks()[:levels]
            codes, _ = ops.rvq_encode(z.detach(), books)
            quantized, loss = self._walk_levels(z, codes, books, train)
            # Straight-through: the value is exactly `quantized` (so forward == decode of its
            # codes) and the gradient reaches z unchanged; z + (q - z).detach() would round.
            out = self.project_out(quantized + (z - z.detach()))
            if levels < self.num_levels:
                codes = F.pad(codes, (0, self.num_levels - levels), value=-1)
        return self._unrows(out.to(x.dtype), lead), codes.reshape(*lead, self.num_levels), loss

    @torch.no_grad()
    def encode(self, x):
        """Codes [*lead, num_levels] int64 of x (every level, no dropout, no state change)."""
        with torch.autocast(x.device.type, enabled=False):
            lead, rows = self._rows(x)
            codes, _ = ops.rvq_encode(self.project_in(rows.float()), self.level_codebooks())
        return codes.reshape(*lead, self.num_levels)

    def decode(self, codes):
        """Reconstruction from codes [*lead, l], l <= num_levels: the first l levels (a coarser
        picture for smaller l); a code of -1 adds nothing. Returns `forward`'s layout, fp32."""
        levels = codes.shape[-1]
        if levels > self.num_levels:
            raise ValueError(f"ResidualVQ.decode: codes {list(codes.shape)} have {levels} levels, "
                             f"the module {self.num_levels}")
        lead = codes.shape[:-1]
        with torch.autocast(codes.device.type, enabled=False):
            q = ops.rvq_decode(codes.reshape(-1, levels), self.level_codebooks()[:levels])
            return self._unrows(self.project_out(q), lead)

    @classmethod
    def from_vector_quantize_pytorch(cls, rvq):
        """A ResidualVQ holding the codebooks, EMA statistics and projections of a
        `vector_quantize_pytorch.ResidualVQ` (uniform codebook size, Euclidean, one head, no
        implicit neural codebook). Its eval codes match; its training loss does not (it takes
        the commitment loss per level, this module over partial sums)."""
        layers = list(rvq.layers)
        book = layers[0]._codebook
        unsupported = [name for name, bad in (
            ("implicit neural codebooks", getattr(rvq, "implicit_neural_codebook", False)),
            ("codebook sizes that differ between levels", not getattr(rvq, "uniform_codebook_size", True)),
            ("cosine-similarity codebooks", getattr(book, "use_cosine_sim", False)),
            ("affine codebook parameters", getattr(book, "affine_param", False)),
            ("several codebooks per level (heads)", book.embed.shape[0] != 1),
        ) if bad]
        if unsupported:
            raise ValueError(f"ResidualVQ.from_vector_quantize_pytorch: unsupported {', '.join(unsupported)}")
        shared = bool(getattr(rvq, "shared_codebook", False))
        sources = [layer._codebook for layer in (layers[:1] if shared else layers)]
        codebook_size, codebook_dim = book.embed.shape[1:]
        project_in = rvq.project_in
        dim = project_in.in_features if isinstance(project_in, nn.Linear) else codebook_dim
        module = cls(dim, codebook_size, len(layers), codebook_dim=codebook_dim, shared_codebook=shared,
                     decay=book.decay, commitment_weight=layers[0].commitment_weight,
                     dead_code_threshold=book.threshold_ema_dead_code,
                     quantize_dropout=bool(rvq.quantize_dropout), kmeans_iters=book.kmeans_iters,
                     eps=book.eps, channels_first=bool(getattr(rvq, "accept_image_fmap", False)))
        module = module.to(book.embed.device)
        with torch.no_grad():
            module.codebooks.copy_(torch.cat([s.embed for s in sources]))
            module.ema_cluster_size.copy_(torch.cat([s.cluster_size for s in sources]))
            module.ema_embed_sum.copy_(torch.cat([s.embed_avg for s in sources]))
            # Codebooks it has not k-means-initialized yet get initialized here instead.
            module.initted.fill_(all(bool(s.initted) for s in sources))
        if isinstance(project_in, nn.Linear):
            module.project_in.load_state_dict(project_in.state_dict())
            module.project_out.load_state_dict(rvq.project_out.state_dict())
        return module

    def _rows(self, x):
        channel = 1 if self.channels_first else -1
        if x.dim() <= max(channel, 0) or x.shape[channel] != self.dim:
            layout = "[B, dim, *spatial]" if self.channels_first else "[..., dim]"
            raise ValueError(f"ResidualVQ: expected x {layout} with dim={self.dim}, got {list(x.shape)}")
        x = x.movedim(channel, -1)
        return x.shape[:-1], x.reshape(-1, self.dim)

    def _unrows(self, rows, lead):
        out = rows.reshape(*lead, self.dim)
        return out.movedim(-1, 1) if self.channels_first else out

    def _initted(self):
        if not self._initted_seen:
            self._initted_seen = bool(self.initted)
        return self._initted_seen

    @staticmethod
    def _forget_initted(module, incompatible_keys):
        module._initted_seen = False

    def _walk_levels(self, z, codes, books, train):
        """Quantized z (the sum of the chosen codewords) and the commitment loss; in training
        also the EMA update and dead-code restarts, from each level's input residual."""
        zd = z.detach()
        n, levels = codes.shape
        k = self.codebook_size
        used = 1 if self.shared_codebook else levels
        if train:
            counts = zd.new_zeros(used, k)
            sums = zd.new_zeros(used, k, self.codebook_dim)
            # Restart candidates: for each code of each codebook, one random residual that
            # codebook saw this batch (a random level and row when the codebook is shared).
            pick_level = torch.randint(0, levels if self.shared_codebook else 1, (used, k), device=z.device)
            pick_row = torch.randint(0, n, (used, k), device=z.device)
            samples = zd.new_zeros(used, k, self.codebook_dim)
        quantized = torch.zeros_like(zd)
        loss = zd.new_zeros(())
        for level in range(levels):
            idx = codes[:, level]
            if train:
                residual = zd - quantized
                b, slot = (0, level) if self.shared_codebook else (level, 0)
                counts[b].index_add_(0, idx, torch.ones_like(idx, dtype=zd.dtype))
                sums[b].index_add_(0, idx, residual)
                samples[b] = torch.where((pick_level[b] == slot)[:, None], residual[pick_row[b]], samples[b])
            quantized = quantized + books[level].index_select(0, idx)
            loss = loss + F.mse_loss(z, quantized)
        if train:
            self._ema_update(used, counts, sums, samples)
        return quantized, self.commitment_weight * loss / max(levels, 1)

    @torch.no_grad()
    def _ema_update(self, used, counts, sums, samples):
        # Only the codebooks this batch reached: levels dropped by quantize_dropout keep theirs.
        size = self.ema_cluster_size[:used]
        embed_sum = self.ema_embed_sum[:used]
        size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = size.sum(-1, keepdim=True)
        smoothed = (size + self.eps) / (total + self.codebook_size * self.eps) * total
        dead = size < self.dead_code_threshold
        # A restarted code starts as a cluster of exactly the threshold at its new vector.
        size.copy_(torch.where(dead, torch.full_like(size, self.dead_code_threshold), size))
        embed_sum.copy_(torch.where(dead[..., None], samples * self.dead_code_threshold, embed_sum))
        updated = torch.where(dead[..., None], samples, embed_sum / smoothed[..., None])
        self.codebooks[:used] = updated.to(self.codebooks.dtype)

    @torch.no_grad()
    def _kmeans_init(self, z):
        """k-means per level on that level's residual of this batch; a shared codebook gets a
        second k-means over the residuals of all levels, warm-started from the first."""
        residual = z
        if self.shared_codebook:
            means, _ = self._kmeans(z)
            pooled = [z]
            for _ in range(1, self.num_levels):
                residual = residual - means.index_select(0, ops.rvq_encode(residual, means[None])[0][:, 0])
                pooled.append(residual)
            means, counts = self._kmeans(torch.cat(pooled), means)
            found = [(means, counts)]
        else:
            found = []
            for _ in range(self.num_levels):
                means, counts = self._kmeans(residual)
                residual = residual - means.index_select(0, ops.rvq_encode(residual, means[None])[0][:, 0])
                found.append((means, counts))
        means = torch.stack([m for m, _ in found])
        counts = torch.stack([c for _, c in found])
        self.codebooks.copy_(means)
        self.ema_cluster_size.copy_(counts)
        self.ema_embed_sum.copy_(means * counts[..., None])
        self.initted.fill_(True)

    def _kmeans(self, data, means=None):
        """Lloyd's k-means on data [n, d] (assignments by rvq_encode with one level): means
        [K, d] and the cluster sizes of the last assignment. An empty cluster keeps its mean."""
        n, k = data.shape[0], self.codebook_size
        if means is None:
            # Distinct rows while there are enough of them.
            pick = torch.randperm(n, device=data.device)[:k] if n >= k else \
                torch.randint(0, n, (k,), device=data.device)
            means = data[pick]
        counts = data.new_zeros(k)
        for _ in range(self.kmeans_iters):
            assign = ops.rvq_encode(data, means[None])[0][:, 0]
            counts = torch.bincount(assign, minlength=k).to(data.dtype)
            sums = data.new_zeros(k, data.shape[1]).index_add_(0, assign, data)
            means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], means)
        return means, counts
