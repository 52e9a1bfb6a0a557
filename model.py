"""C-DSVAE (Bai, Wang & Gomes, NeurIPS 2021): the network, its losses, and the Sprites judge network.

Shapes: a video x is (B, T, 3, 64, 64) in [0, 1]; f is (B, f_dim); z is (B, T, z_dim).
Nothing here knows about files, flags or devices.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv_block(c_in, c_out, transpose=False):
    conv = (nn.ConvTranspose2d if transpose else nn.Conv2d)(c_in, c_out, 4, 2, 1)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))


class FrameEncoder(nn.Module):
    """64x64 frame -> g_dim: four 4x4 stride-2 convs (nf, 2nf, 4nf, 8nf channels), then a 4x4 valid conv."""

    def __init__(self, g_dim=128, nf=64):
        super().__init__()
        self.net = nn.Sequential(
            _conv_block(3, nf), _conv_block(nf, 2 * nf), _conv_block(2 * nf, 4 * nf), _conv_block(4 * nf, 8 * nf),
            nn.Conv2d(8 * nf, g_dim, 4, 1, 0), nn.BatchNorm2d(g_dim), nn.Tanh())

    def forward(self, x):  # (B, T, 3, 64, 64) -> (B, T, g_dim)
        B, T = x.shape[:2]
        return self.net(x.reshape(B * T, *x.shape[2:])).view(B, T, -1)


class FrameDecoder(nn.Module):
    """[z_t; f] -> 64x64 frame: 4x4 transposed conv to 8nf x 4 x 4, three stride-2 transposed convs, sigmoid."""

    def __init__(self, in_dim, nf=64):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(in_dim, 8 * nf, 4, 1, 0), nn.BatchNorm2d(8 * nf), nn.LeakyReLU(0.2),
            _conv_block(8 * nf, 4 * nf, True), _conv_block(4 * nf, 2 * nf, True), _conv_block(2 * nf, nf, True),
            nn.ConvTranspose2d(nf, 3, 4, 2, 1), nn.Sigmoid())

    def forward(self, h):  # (B, T, in_dim) -> (B, T, 3, 64, 64)
        B, T = h.shape[:2]
        return self.net(h.reshape(B * T, -1, 1, 1)).view(B, T, 3, 64, 64)


class FilmDecoder(nn.Module):
    """z_t -> 64x64 frame, with f only as a per-channel scale and shift (FiLM) after each normalisation: the layout
    of the frame (pose, facing) is drawn from z alone, and f can only recolour and re-weight its feature maps.
    The layers and sizes of FrameDecoder otherwise."""

    def __init__(self, z_dim, f_dim, nf=64):
        super().__init__()
        widths = (8 * nf, 4 * nf, 2 * nf, nf)
        self.stages = nn.ModuleList(
            [nn.Sequential(nn.ConvTranspose2d(z_dim, widths[0], 4, 1, 0), nn.BatchNorm2d(widths[0]))]
            + [nn.Sequential(nn.ConvTranspose2d(a, b, 4, 2, 1), nn.BatchNorm2d(b)) for a, b in zip(widths, widths[1:])])
        self.film = nn.Linear(f_dim, 2 * sum(widths))
        self.widths = widths
        self.out = nn.Sequential(nn.ConvTranspose2d(nf, 3, 4, 2, 1), nn.Sigmoid())

    def forward(self, z, f):  # (B, T, z_dim), (B, f_dim) -> (B, T, 3, 64, 64)
        B, T = z.shape[:2]
        gammas_betas = self.film(f).repeat_interleave(T, 0).split([w for w in self.widths for _ in (0, 1)], dim=1)
        h = z.reshape(B * T, -1, 1, 1)
        for i, stage in enumerate(self.stages):
            gamma, beta = gammas_betas[2 * i][..., None, None], gammas_betas[2 * i + 1][..., None, None]
            h = F.leaky_relu(stage(h) * (1 + gamma) + beta, 0.2)
        return self.out(h).view(B, T, 3, 64, 64)


def init_weights(module, deconv_normal=True):
    """Conv2d / Linear weights N(0, 0.01), biases 0; BatchNorm 1 and 0: the paper repo's initialisation.
    deconv_normal=True draws ConvTranspose2d the same way (ours); the paper leaves them at PyTorch's default."""
    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear) if deconv_normal else (nn.Conv2d, nn.Linear)
    for m in module.modules():
        if isinstance(m, kinds):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def reparameterize(mean, logvar, random=True):
    """A sample of N(mean, e^logvar), drawn in fp32 whatever the autocast (bf16 would round the noise)."""
    if not random:
        return mean
    mean, logvar = mean.float(), logvar.float()
    return mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)


class CDSVAE(nn.Module):
    """Static f from a BiLSTM over frame features; dynamic z_t from an RNN over the BiLSTM outputs;
    learned prior p(z_t | z_<t) from two stacked LSTM cells; per-frame deconv decoder of [z_t; f].

    z_input selects what the dynamic posterior reads: 'bilstm' (the paper) or 'frame_delta' (the BiLSTM
    run over each frame's features minus the video's mean frame feature, which removes the part that is
    constant over the video, i.e. most of the appearance), or 'full' (DSVAE's "full" q(z_t | x, f), Li & Mandt
    2018: a BiLSTM of its own over each frame's features joined with the sample of f).
    f_mirror=True makes q(f|x) exactly invariant to mirroring the video left-right: f reads the mean of the
    BiLSTM summaries of the video and of its mirror image (one more encoder pass), so the facing direction,
    which the mirror turns left into right, cannot reach f.
    f_film=True decodes with FilmDecoder: the frame's layout comes from z_t alone, f only modulates channels.
    f_head_leaky=True makes q(f|x)'s mean and log-variance heads a Linear followed by LeakyReLU(0.2), as the
    paper's LinearUnit(..., batchnorm=False); False (the default, for the checkpoints written before) plain Linear.
    deconv_normal: see init_weights (True, the default: ours; False: the paper's).
    """

    def __init__(self, f_dim=256, z_dim=32, g_dim=128, rnn_size=256, nf=64, frames=8, z_input="bilstm",
                 f_mirror=False, f_film=False, f_head_leaky=False, deconv_normal=True):
        super().__init__()
        if z_input not in ("bilstm", "frame_delta", "full"):
            raise ValueError(f"z_input must be 'bilstm', 'frame_delta' or 'full', got {z_input!r}")
        self.f_dim, self.z_dim, self.g_dim, self.rnn_size, self.frames = f_dim, z_dim, g_dim, rnn_size, frames
        self.z_input, self.f_mirror, self.f_film = z_input, f_mirror, f_film
        self.encoder = FrameEncoder(g_dim, nf)
        self.decoder = FilmDecoder(z_dim, f_dim, nf) if f_film else FrameDecoder(z_dim + f_dim, nf)
        self.z_lstm = nn.LSTM(g_dim, rnn_size, batch_first=True, bidirectional=True)  # shared by q(f|x) and q(z|x)
        self.f_mean, self.f_logvar = (nn.Sequential(nn.Linear(2 * rnn_size, f_dim), nn.LeakyReLU(0.2)) if f_head_leaky
                                      else nn.Linear(2 * rnn_size, f_dim) for _ in range(2))
        if z_input == "full":
            self.zf_lstm = nn.LSTM(g_dim + f_dim, rnn_size, batch_first=True, bidirectional=True)
        self.z_rnn = nn.RNN(2 * rnn_size, rnn_size, batch_first=True)
        self.z_mean, self.z_logvar = nn.Linear(rnn_size, z_dim), nn.Linear(rnn_size, z_dim)
        self.z_prior_lstm_1, self.z_prior_lstm_2 = nn.LSTMCell(z_dim, rnn_size), nn.LSTMCell(rnn_size, rnn_size)
        self.z_prior_mean, self.z_prior_logvar = nn.Linear(rnn_size, z_dim), nn.Linear(rnn_size, z_dim)
        init_weights(self, deconv_normal)

    # ---- posteriors -------------------------------------------------------------------------------------
    def encode(self, x, random=True, need_f=True):
        """Posterior means, log-variances and samples of f (B, f_dim) and z (B, T, z_dim).
        need_f=False skips f_mirror's extra pass when only z is used: f is then of the unmirrored video only."""
        g_mirror = self.encoder(x.flip(-1)) if self.f_mirror and need_f else None
        return self.encode_features(self.encoder(x), random, g_mirror)

    def _f_summary(self, lstm_out):
        # the forward state at the last frame and the backward state at the first frame
        return torch.cat([lstm_out[:, -1, :self.rnn_size], lstm_out[:, 0, self.rnn_size:]], dim=1)

    def _f_input(self, lstm_out, g_mirror=None):
        # q(f|x)'s input: the BiLSTM summary of the video, averaged with its mirror image's under f_mirror
        f_in = self._f_summary(lstm_out)
        if g_mirror is not None:
            f_in = 0.5 * (f_in + self._f_summary(self.z_lstm(g_mirror)[0]))
        return f_in

    def encode_features(self, g, random=True, g_mirror=None):
        """The posteriors from frame features g (B, T, g_dim) and, for f_mirror, those of the mirrored frames."""
        lstm_out, _ = self.z_lstm(g)
        f_in = self._f_input(lstm_out, g_mirror)
        f_mean, f_logvar = self.f_mean(f_in), self.f_logvar(f_in)
        f = reparameterize(f_mean, f_logvar, random)
        if self.z_input == "frame_delta":
            lstm_out, _ = self.z_lstm(g - g.mean(dim=1, keepdim=True))
        elif self.z_input == "full":
            lstm_out, _ = self.zf_lstm(torch.cat([g, f[:, None].to(g.dtype).expand(-1, g.shape[1], -1)], dim=2))
        z_features, _ = self.z_rnn(lstm_out)
        z_mean, z_logvar = self.z_mean(z_features), self.z_logvar(z_features)
        return {"f_mean": f_mean, "f_logvar": f_logvar, "f": f,
                "z_mean": z_mean, "z_logvar": z_logvar, "z": reparameterize(z_mean, z_logvar, random)}

    def decode(self, z, f):
        """(B, T, z_dim), (B, f_dim) -> (B, T, 3, 64, 64)."""
        if self.f_film:
            return self.decoder(z, f)
        return self.decoder(torch.cat([z, f[:, None].expand(-1, z.shape[1], -1)], dim=2))

    # ---- prior ------------------------------------------------------------------------------------------
    def _prior_step(self, z_prev, state):
        h1, c1, h2, c2 = state
        h1, c1 = self.z_prior_lstm_1(z_prev, (h1, c1))
        h2, c2 = self.z_prior_lstm_2(h1, (h2, c2))
        return self.z_prior_mean(h2), self.z_prior_logvar(h2), (h1, c1, h2, c2)

    def _prior_state(self, B, like):
        return tuple(like.new_zeros(B, self.rnn_size) for _ in range(4))

    def prior(self, z_post):
        """p(z_t | z_<t) with teacher forcing: step t is fed the posterior sample z_{t-1} (z_0 = 0)."""
        B, T, _ = z_post.shape
        state = self._prior_state(B, z_post)
        z_prev = z_post.new_zeros(B, self.z_dim)
        means, logvars = [], []
        for t in range(T):
            m, lv, state = self._prior_step(z_prev, state)
            means.append(m)
            logvars.append(lv)
            z_prev = z_post[:, t]
        return torch.stack(means, 1), torch.stack(logvars, 1)

    def sample_z_prior(self, B, T=None, random=True, like=None):
        """A path of the prior (B, T, z_dim), each step fed its own sample: (the per-step means, the samples).
        The paper decodes the means along the sampled path (its protocol B)."""
        T = T or self.frames
        like = like if like is not None else next(self.parameters())
        state = self._prior_state(B, like)
        z_prev, means, zs = like.new_zeros(B, self.z_dim), [], []
        for _ in range(T):
            m, lv, state = self._prior_step(z_prev, state)
            z_prev = reparameterize(m, lv, random)
            means.append(m)
            zs.append(z_prev)
        return torch.stack(means, 1), torch.stack(zs, 1)

    # ---- generation -------------------------------------------------------------------------------------
    def forward(self, x, c_aug=None, m_aug=None, c_aug_order=None, cycle=False, recon_m_aug=False, swap=False):
        """Posterior, prior (teacher forced) and reconstruction of x; posteriors of the augmented views.

        c_aug_order (B, T): when c_aug is x with frames in that order, its frame features are x's shuffled
        (BatchNorm's batch statistics are over the same frames), which saves an encoder pass.
        The augmented views need only the encoder and posteriors: they are not decoded.
        cycle: also decode each video's z with a new f (even rows: f ~ N(0, I), odd rows: the previous video's
        f) and encode that video again ('cyc_post'), so that a loss can ask its z to be the original z.
        recon_m_aug: the even rows are reconstructed from their f and the z of their motion view (recoloured and
        blurred), so that colour which z carries is wrong there and the decoder must take the colours from f.
        swap: rows 0, 4, 8, ... again, through a swap: decode their f means with a z not theirs (rows 0, 8, ...: a
        prior path's means, as protocol B; rows 4, 12, ...: the previous video's z, as a swap), read f from that
        video, and decode it with the row's own z ('swap_recon' of 'swap_x', the z's held fixed), so that
        reconstructing x from it needs the swapped video to show x's content, whatever its motion."""
        g = self.encoder(x)
        g_mirror = self.encoder(x.flip(-1)) if self.f_mirror else None
        out = self.encode_features(g, g_mirror=g_mirror)
        out["z_prior_mean"], out["z_prior_logvar"] = self.prior(out["z"])
        z_decoded = out["z"]
        if recon_m_aug:
            if m_aug is None:
                raise ValueError("recon_m_aug needs the motion view m_aug")
            out["m_post"] = self.encode(m_aug, need_f=False)
            even_rows = (torch.arange(len(x), device=x.device) % 2 == 0)[:, None, None]
            z_decoded = torch.where(even_rows, out["m_post"]["z"].to(z_decoded.dtype), z_decoded)
        out["recon"] = self.decode(z_decoded, out["f"])
        if c_aug_order is not None:
            rows = torch.arange(len(g), device=g.device)[:, None]
            out["c_post"] = self.encode_features(g[rows, c_aug_order],
                                                 g_mirror=None if g_mirror is None else g_mirror[rows, c_aug_order])
        elif c_aug is not None:
            out["c_post"] = self.encode(c_aug)
        if m_aug is not None and "m_post" not in out:
            out["m_post"] = self.encode(m_aug, need_f=False)  # the motion view's f is not used
        if cycle:
            f_other = out["f"].roll(1, dims=0)
            prior_rows = (torch.arange(len(x), device=x.device) % 2 == 0)[:, None]
            out["f_cyc"] = torch.where(prior_rows, torch.randn_like(f_other), f_other)
            out["cyc_post"] = self.encode(self.decode(out["z"], out["f_cyc"]))
        if swap:
            rows = torch.arange(0, len(x), 4, device=x.device)
            out["swap_recon"], out["swap_x"] = self._swap_recon(out, rows), x[rows]
        return out

    def _swap_recon(self, out, rows):
        f_mean = out["f_mean"][rows]
        z_prior = self.sample_z_prior(len(rows), like=f_mean)[0]
        z_other = out["z"].roll(1, dims=0)[rows].to(z_prior.dtype)
        prior_rows = (torch.arange(len(rows), device=rows.device) % 2 == 0)[:, None, None]
        video = self.decode(torch.where(prior_rows, z_prior, z_other).detach(), f_mean)
        g_mirror = self.encoder(video.flip(-1)) if self.f_mirror else None
        f_again = self.f_mean(self._f_input(self.z_lstm(self.encoder(video))[0], g_mirror))
        return self.decode(out["z"][rows].detach(), f_again)

    @torch.no_grad()
    def generate_fixed_motion(self, x):
        """Keep each video's dynamics (posterior mean of z), draw f ~ N(0, I): the paper's protocol."""
        post = self.encode(x, random=False)
        return self.decode(post["z_mean"], torch.randn_like(post["f_mean"]))

    @torch.no_grad()
    def generate_fixed_content(self, x):
        """Keep each video's content (posterior mean of f), decode the learned prior's per-step means along a
        sampled path (the paper's protocol B)."""
        post = self.encode(x, random=False)
        return self.decode(self.sample_z_prior(x.shape[0], x.shape[1], like=post["f_mean"])[0], post["f_mean"])

    @torch.no_grad()
    def swap(self, x1, x2):
        """f of x1 with z of x2, and f of x2 with z of x1 (posterior means)."""
        p1, p2 = self.encode(x1, random=False), self.encode(x2, random=False)
        return self.decode(p2["z_mean"], p1["f_mean"]), self.decode(p1["z_mean"], p2["f_mean"])


# ---- losses ---------------------------------------------------------------------------------------------
def kl_gaussians(mean_q, logvar_q, mean_p, logvar_p):
    """KL(N(mean_q, e^logvar_q) || N(mean_p, e^logvar_p)), elementwise."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mean_q - mean_p) ** 2) / logvar_p.exp() - 1)


def log_density_gaussian(x, mean, logvar):
    """log N(x; mean, e^logvar), elementwise (the true density: the paper repo passes logvar as log std)."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 / logvar.exp())


def nt_xent(a, b, temperature=0.5):
    """NT-Xent (SimCLR): a[i] and b[i] are positives; the other 2B-2 views of the batch are negatives.
    Cosine similarity / temperature; mean over the 2B anchors."""
    B = a.shape[0]
    v = F.normalize(torch.cat([a.flatten(1), b.flatten(1)]), dim=1)
    sim = v @ v.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=sim.device), float("-inf"))
    target = torch.cat([torch.arange(B, 2 * B), torch.arange(B)]).to(sim.device)
    return F.cross_entropy(sim, target)


def mutual_information(f, f_mean, f_logvar, z, z_mean, z_logvar, dataset_size):
    """Minibatch-weighted-sampling estimate of I(f; z_t), averaged over samples and frames:
    mean relu(log q(f, z_t) - log q(f) - log q(z_t)), log q(.) ~ logsumexp_j log q(.|x_j) - log(B N)."""
    B, T, _ = z.shape
    log_bn = math.log(B * dataset_size)
    # [i, j]: log q(f_i | x_j), summed over dimensions
    log_qf = log_density_gaussian(f[:, None], f_mean[None], f_logvar[None]).sum(-1)             # (B, B)
    # [i, j, t]: log q(z_{i,t} | x_j)
    log_qz = log_density_gaussian(z[:, None], z_mean[None], z_logvar[None]).sum(-1)             # (B, B, T)
    log_q_f = torch.logsumexp(log_qf, dim=1) - log_bn                                          # (B,)
    log_q_z = torch.logsumexp(log_qz, dim=1) - log_bn                                          # (B, T)
    log_q_fz = torch.logsumexp(log_qf[..., None] + log_qz, dim=1) - log_bn                     # (B, T)
    return F.relu(log_q_fz - log_q_f[:, None] - log_q_z).mean()


class FZCritic(nn.Module):
    """Tells a video's own pair (f, z_1:T) from pairs of f and another video's z. Trained with critic_loss, its
    logit estimates the density ratio log q(f, z) / (q(f) q(z)), so its mean over own pairs estimates I(f; z)
    (the density-ratio trick of FactorVAE, Kim & Mnih 2018). Unlike the minibatch estimate it does not saturate:
    its gradient tells the encoders which shared information (the facing direction, say) to drop from f or z."""

    def __init__(self, f_dim, z_dim, frames, hidden=512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(f_dim + frames * z_dim, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, f, z):  # (B, f_dim), (B, T, z_dim) -> logits (B,)
        return self.net(torch.cat([f, z.flatten(1)], dim=1)).squeeze(1)


def critic_loss(critic, f, z, shift=1):
    """The critic's binary cross-entropy: own pairs (f_i, z_i) are 1, pairs (f_i, z_{i+shift mod B}) are 0."""
    own, other = critic(f, z), critic(f, z.roll(shift, dims=0))
    return (F.binary_cross_entropy_with_logits(own, torch.ones_like(own))
            + F.binary_cross_entropy_with_logits(other, torch.zeros_like(other)))


def cdsvae_loss(out, x, dataset_size, weight_f=1.0, weight_z=1.0, weight_c_aug=10.0, weight_m_aug=10.0,
                weight_mi=1.0, weight_rec=1.0, temperature=0.5, weight_cyc=0.0, gather=None, critic=None,
                weight_critic=0.0, weight_swap=0.0):
    """Total loss and every term from the outputs of CDSVAE.forward (per video: sums over frames and
    pixels divided by the batch size). Terms are computed in fp32 whatever the autocast.

    mi_critic (with a critic): the FZCritic's estimate of I(f; z), the mean of its logits on the batch's own
    (f, z) samples, weighted by weight_critic; the critic itself is trained apart (critic_loss).
    swap_rec (when forward ran with swap=True): the reconstruction of every 4th video from its own z and the f read
    from its swapped video (per video, as recon).
    con_cyc (when forward ran with cycle=True): NT-Xent between z of the video decoded with a new f, encoded
    again, and the original z (held fixed): the decoder pays when the motion it draws follows f instead of z.
    gather: for k processes, a function of a local batch tensor to the whole batch's (all processes' rows in
    order, with gradients that reach each process's own rows): the InfoNCE and MI terms, which compare the videos
    of a batch with each other, are then those of the whole batch, and the per-video terms are local means, so
    that k processes averaging their gradients optimise what one process does on the whole batch."""
    B = x.shape[0]
    gather = gather or (lambda t: t)
    out = {k: v.float() if torch.is_tensor(v) else {kk: vv.float() for kk, vv in v.items()} for k, v in out.items()}
    recon = F.mse_loss(out["recon"], x, reduction="sum") / B
    kld_f = kl_gaussians(out["f_mean"], out["f_logvar"], torch.zeros_like(out["f_mean"]),
                         torch.zeros_like(out["f_logvar"])).sum() / B
    kld_z = kl_gaussians(out["z_mean"], out["z_logvar"], out["z_prior_mean"], out["z_prior_logvar"]).sum() / B
    whole = {k: gather(out[k]) for k in ("f", "f_mean", "f_logvar", "z", "z_mean", "z_logvar")}
    mi = mutual_information(*whole.values(), dataset_size)
    terms = {"recon": recon, "kld_f": kld_f, "kld_z": kld_z, "mi_fz": mi}
    total = weight_rec * recon + weight_f * kld_f + weight_z * kld_z + weight_mi * mi
    if "c_post" in out:
        terms["con_f"] = nt_xent(whole["f_mean"], gather(out["c_post"]["f_mean"]), temperature)
        total = total + weight_c_aug * terms["con_f"]
    if "m_post" in out:
        terms["con_z"] = nt_xent(whole["z_mean"], gather(out["m_post"]["z_mean"]), temperature)
        total = total + weight_m_aug * terms["con_z"]
    if "cyc_post" in out:
        terms["con_cyc"] = nt_xent(whole["z_mean"].detach(), gather(out["cyc_post"]["z_mean"]), temperature)
        total = total + weight_cyc * terms["con_cyc"]
    if "swap_recon" in out:
        terms["swap_rec"] = F.mse_loss(out["swap_recon"], out["swap_x"], reduction="sum") / len(out["swap_x"])
        total = total + weight_swap * terms["swap_rec"]
    if critic is not None:
        terms["mi_critic"] = critic(whole["f"], whole["z"]).mean()
        total = total + weight_critic * terms["mi_critic"]
    terms["loss"] = total
    return total, terms


# ---- the judge --------------------------------------------------------------------------------------------
JUDGE_HEADS = {"action": 9, "skin": 6, "pant": 6, "top": 6, "hair": 6}


class SpriteJudge(nn.Module):
    """Classifier of a Sprites video: frame encoder, BiLSTM, and one MLP head per factor.
    Heads: action (the D label, 9 classes) and skin, pant, top, hair (the columns of A, 6 classes each)."""

    def __init__(self, g_dim=128, rnn_size=256, hidden=256, nf=64):
        super().__init__()
        self.encoder = FrameEncoder(g_dim, nf)
        self.lstm = nn.LSTM(g_dim, rnn_size, batch_first=True, bidirectional=True)
        self.rnn_size = rnn_size
        self.heads = nn.ModuleDict({k: nn.Sequential(nn.Linear(2 * rnn_size, hidden), nn.ReLU(), nn.Linear(hidden, n))
                                    for k, n in JUDGE_HEADS.items()})

    def forward(self, x):
        """(B, T, 3, 64, 64) in [0, 1] -> {head: logits (B, classes)}."""
        out, _ = self.lstm(self.encoder(x))
        h = torch.cat([out[:, -1, :self.rnn_size], out[:, 0, self.rnn_size:]], dim=1)
        return {k: head(h) for k, head in self.heads.items()}


class ClipJudge(nn.Module):
    """The second judge, of another family than SpriteJudge: 3D convolutions over the whole clip (space and time
    together from the first layer on; no per-frame encoder, no recurrence), average-pooled to a 2x2x2 grid of
    (time, height, width) cells, and one MLP head per factor, as SpriteJudge."""

    def __init__(self, nf=32, hidden=256):
        super().__init__()

        def block(c_in, c_out, kernel, stride, padding):
            return [nn.Conv3d(c_in, c_out, kernel, stride, padding, bias=False), nn.BatchNorm3d(c_out), nn.ReLU()]

        self.net = nn.Sequential(
            *block(3, nf, (3, 5, 5), (1, 2, 2), (1, 2, 2)),   # 8 x 32 x 32
            *block(nf, 2 * nf, 3, (1, 2, 2), 1),              # 8 x 16 x 16
            *block(2 * nf, 4 * nf, 3, 2, 1),                  # 4 x 8 x 8
            *block(4 * nf, 8 * nf, 3, 2, 1),                  # 2 x 4 x 4
            nn.AdaptiveAvgPool3d(2), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Sequential(nn.Linear(64 * nf, hidden), nn.ReLU(), nn.Linear(hidden, n))
                                    for k, n in JUDGE_HEADS.items()})

    def forward(self, x):
        """(B, T, 3, 64, 64) in [0, 1] -> {head: logits (B, classes)}."""
        h = self.net(x.transpose(1, 2))
        return {k: head(h) for k, head in self.heads.items()}


JUDGES = {"bilstm": SpriteJudge, "conv3d": ClipJudge}  # a judge file's 'arch' names its network
