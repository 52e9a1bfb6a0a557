"""C-DSVAE (Bai, Wang & Gomes, NeurIPS 2021): the network and its losses; nothing of files or flags.

Shapes: a video x is (B, T, C, 64, 64) in [0, 1], C channels (Sprites 3, Moving MNIST 1); f is
(B, f_dim); z is (B, T, z_dim).
"""
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv_block(c_in, c_out, transpose=False):
    conv = (nn.ConvTranspose2d if transpose else nn.Conv2d)(c_in, c_out, 4, 2, 1)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))


class FrameEncoder(nn.Module):
    """64x64 frame -> g_dim: four 4x4 stride-2 convs (nf, 2nf, 4nf, 8nf), then a 4x4 valid conv."""

    def __init__(self, g_dim=128, nf=64, channels=3):
        super().__init__()
        self.net = nn.Sequential(
            _conv_block(channels, nf), _conv_block(nf, 2 * nf), _conv_block(2 * nf, 4 * nf), _conv_block(4 * nf, 8 * nf),
            nn.Conv2d(8 * nf, g_dim, 4, 1, 0), nn.BatchNorm2d(g_dim), nn.Tanh())

    def forward(self, x):  # (B, T, C, 64, 64) -> (B, T, g_dim)
        B, T = x.shape[:2]
        return self.net(x.reshape(B * T, *x.shape[2:])).view(B, T, -1)


class FrameDecoder(nn.Module):
    """[z_t; f] -> 64x64 frame: 4x4 deconv to 8nf x 4 x 4, four stride-2 deconvs, a sigmoid."""

    def __init__(self, in_dim, nf=64, channels=3):
        super().__init__()
        self.channels = channels
        self.net = nn.Sequential(
            nn.ConvTranspose2d(in_dim, 8 * nf, 4, 1, 0), nn.BatchNorm2d(8 * nf), nn.LeakyReLU(0.2),
            _conv_block(8 * nf, 4 * nf, True), _conv_block(4 * nf, 2 * nf, True), _conv_block(2 * nf, nf, True),
            nn.ConvTranspose2d(nf, channels, 4, 2, 1), nn.Sigmoid())

    def forward(self, h):  # (B, T, in_dim) -> (B, T, C, 64, 64)
        B, T = h.shape[:2]
        return self.net(h.reshape(B * T, -1, 1, 1)).view(B, T, self.channels, 64, 64)


def init_weights(module, deconv_normal=True):
    """The paper repo's initialisation: weights N(0, 0.01), biases 0, BatchNorm 1 and 0; its
    ConvTranspose2d keep PyTorch's unless deconv_normal (ours)."""
    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear) if deconv_normal else (nn.Conv2d, nn.Linear)
    for m in module.modules():
        if isinstance(m, kinds):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def recurrent(call, x):
    """call(x) for an RNN or LSTM. Under bf16 autocast on a GPU it runs in fp32: cuDNN's autocast
    runs recurrent layers in fp16 whatever autocast's dtype (ATen's AutocastRNN.cpp), and a bf16
    run scales no loss, so fp16 gradients could underflow. Elsewhere as autocast has it."""
    if (x.is_cuda and torch.is_autocast_enabled("cuda")
            and torch.get_autocast_dtype("cuda") == torch.bfloat16):
        with torch.autocast("cuda", enabled=False):
            return call(x.float())
    return call(x)


def reparameterize(mean, logvar, random=True):
    """A sample of N(mean, e^logvar), in fp32 whatever the autocast (bf16 would round the noise)."""
    if not random:
        return mean
    mean, logvar = mean.float(), logvar.float()
    return mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)


class CDSVAE(nn.Module):
    """Static f from a BiLSTM over frame features; dynamic z_t from an RNN over the BiLSTM outputs;
    learned prior p(z_t | z_<t) from two stacked LSTM cells; per-frame deconv decoder of [z_t; f].

    z_input, what q(z|x) reads: 'bilstm' (the paper), 'frame_delta' (the BiLSTM over each frame's
    features less the video's mean: less appearance), or 'full' (DSVAE's q(z_t | x, f), a BiLSTM
    over [features; f]). f_mirror: q(f|x) averages the video's and its mirror image's summaries, so
    the facing direction cannot reach f. f_head_leaky: q(f|x)'s heads end in LeakyReLU(0.2) (the
    paper's)."""

    def __init__(self, f_dim=256, z_dim=32, g_dim=128, rnn_size=256, nf=64, frames=8,
                 z_input="bilstm", f_mirror=False, f_head_leaky=False, deconv_normal=True,
                 channels=3):
        super().__init__()
        if z_input not in ("bilstm", "frame_delta", "full"):
            raise ValueError(f"z_input must be 'bilstm', 'frame_delta' or 'full', got {z_input!r}")
        self.f_dim, self.z_dim, self.g_dim, self.rnn_size, self.frames = f_dim, z_dim, g_dim, rnn_size, frames
        self.z_input, self.f_mirror = z_input, f_mirror
        self.encoder = FrameEncoder(g_dim, nf, channels)
        self.decoder = FrameDecoder(z_dim + f_dim, nf, channels)
        # the paper's name; this BiLSTM is shared by q(f|x) and q(z|x)
        self.z_lstm = nn.LSTM(g_dim, rnn_size, batch_first=True, bidirectional=True)
        self.f_mean, self.f_logvar = (
            nn.Sequential(nn.Linear(2 * rnn_size, f_dim), nn.LeakyReLU(0.2)) if f_head_leaky
            else nn.Linear(2 * rnn_size, f_dim) for _ in range(2))
        if z_input == "full":
            self.zf_lstm = nn.LSTM(g_dim + f_dim, rnn_size, batch_first=True, bidirectional=True)
        self.z_rnn = nn.RNN(2 * rnn_size, rnn_size, batch_first=True)
        self.z_mean, self.z_logvar = nn.Linear(rnn_size, z_dim), nn.Linear(rnn_size, z_dim)
        self.z_prior_lstm_1, self.z_prior_lstm_2 = nn.LSTMCell(z_dim, rnn_size), nn.LSTMCell(rnn_size, rnn_size)
        self.z_prior_mean, self.z_prior_logvar = nn.Linear(rnn_size, z_dim), nn.Linear(rnn_size, z_dim)
        self.prior_one_call = False  # not a weight: utils.prepare_for_device sets it on a GPU
        init_weights(self, deconv_normal)

    # ---- posteriors ------------------------------------------------------------------------------
    def encode(self, x, random=True, need_f=True):
        """Posterior means, log-variances and samples of f, z; need_f=False skips f_mirror's pass."""
        g_mirror = self.encoder(x.flip(-1)) if self.f_mirror and need_f else None
        return self.encode_features(self.encoder(x), random, g_mirror)

    def _f_summary(self, lstm_out):
        # the forward state at the last frame and the backward state at the first frame
        return torch.cat([lstm_out[:, -1, :self.rnn_size], lstm_out[:, 0, self.rnn_size:]], dim=1)

    def _f_input(self, lstm_out, g_mirror=None):
        # q(f|x)'s input: the video's BiLSTM summary, averaged with its mirror image's (f_mirror)
        f_in = self._f_summary(lstm_out)
        if g_mirror is not None:
            f_in = 0.5 * (f_in + self._f_summary(recurrent(self.z_lstm, g_mirror)[0]))
        return f_in

    def encode_features(self, g, random=True, g_mirror=None):
        """The posteriors from frame features g (B, T, g_dim) and the mirrored frames' ones."""
        lstm_out, _ = recurrent(self.z_lstm, g)
        f_in = self._f_input(lstm_out, g_mirror)
        f_mean, f_logvar = self.f_mean(f_in), self.f_logvar(f_in)
        f = reparameterize(f_mean, f_logvar, random)
        if self.z_input == "frame_delta":
            lstm_out, _ = recurrent(self.z_lstm, g - g.mean(dim=1, keepdim=True))
        elif self.z_input == "full":
            f_frames = f[:, None].to(g.dtype).expand(-1, g.shape[1], -1)
            lstm_out, _ = recurrent(self.zf_lstm, torch.cat([g, f_frames], dim=2))
        z_features, _ = recurrent(self.z_rnn, lstm_out)
        z_mean, z_logvar = self.z_mean(z_features), self.z_logvar(z_features)
        return {"f_mean": f_mean, "f_logvar": f_logvar, "f": f,
                "z_mean": z_mean, "z_logvar": z_logvar, "z": reparameterize(z_mean, z_logvar, random)}

    def decode(self, z, f):
        """(B, T, z_dim), (B, f_dim) -> (B, T, C, 64, 64)."""
        return self.decoder(torch.cat([z, f[:, None].expand(-1, z.shape[1], -1)], dim=2))

    # ---- prior -----------------------------------------------------------------------------------
    def _prior_step(self, z_prev, state):
        h1, c1, h2, c2 = state
        h1, c1 = self.z_prior_lstm_1(z_prev, (h1, c1))
        h2, c2 = self.z_prior_lstm_2(h1, (h2, c2))
        return self.z_prior_mean(h2), self.z_prior_logvar(h2), (h1, c1, h2, c2)

    def _prior_state(self, B, like):
        return tuple(like.new_zeros(B, self.rnn_size) for _ in range(4))

    def prior(self, z_post):
        """p(z_t | z_<t), teacher forced: step t is fed the posterior sample z_{t-1} (z_0 = 0).
        With prior_one_call, the two cells run as one 2-layer LSTM call over the frames (on a GPU
        one cuDNN kernel each way, not launches for each cell, head and frame); else cell by cell,
        the order of sums the CPU runs were trained with (the same maths, other rounding)."""
        if self.prior_one_call:
            return self._prior_in_one_call(z_post)
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

    def _prior_in_one_call(self, z_post):
        """prior's means and log-variances from one LSTM call with the cells' own weights, in their
        dtype whatever the autocast (cuDNN's would run it in fp16, and oneDNN refuses the CPU's)."""
        cells = (self.z_prior_lstm_1, self.z_prior_lstm_2)
        weights = [w for c in cells for w in (c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh)]
        z_post = z_post.to(weights[0].dtype)
        z_prev = torch.cat([z_post.new_zeros(z_post.shape[0], 1, self.z_dim), z_post[:, :-1]], 1)
        h0 = z_post.new_zeros(2, z_post.shape[0], self.rnn_size)
        with torch.autocast(z_post.device.type, enabled=False), warnings.catch_warnings():
            # cuDNN copies the cells' weights into its layout each call (a few MB), and says so
            warnings.filterwarnings("ignore", message="RNN module weights are not part")
            # (input, (h0, c0), weights, biases, layers, dropout, train, bidirectional, batch_first)
            h2 = torch._VF.lstm(z_prev, (h0, h0), weights, True, 2, 0.0, self.training, False,
                                True)[0]
        return self.z_prior_mean(h2), self.z_prior_logvar(h2)

    def sample_z_prior(self, B, T=None, random=True, like=None):
        """A path of the prior, each step fed its own sample: (per-step means, samples)."""
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

    # ---- generation ------------------------------------------------------------------------------
    def forward(self, x, m_aug=None, c_aug_order=None):
        """Posterior, prior and reconstruction of x; the posteriors of the views, not decoded. The
        content view's frame features are x's in the order c_aug_order (the same BatchNorm
        statistics, one encoder pass fewer); the motion view m_aug's f is not used."""
        g = self.encoder(x)
        g_mirror = self.encoder(x.flip(-1)) if self.f_mirror else None
        out = self.encode_features(g, g_mirror=g_mirror)
        out["z_prior_mean"], out["z_prior_logvar"] = self.prior(out["z"])
        out["recon"] = self.decode(out["z"], out["f"])
        if c_aug_order is not None:
            rows = torch.arange(len(g), device=g.device)[:, None]
            out["c_post"] = self.encode_features(
                g[rows, c_aug_order], g_mirror=None if g_mirror is None else g_mirror[rows, c_aug_order])
        if m_aug is not None:
            out["m_post"] = self.encode(m_aug, need_f=False)
        return out

    @torch.no_grad()
    def generate_fixed_motion(self, x):
        """Protocol A on videos x (see fixed_motion)."""
        post = self.encode(x, random=False)
        return self.decode(*fixed_motion(post["z_mean"], post["f_mean"]))

    @torch.no_grad()
    def generate_fixed_content(self, x):
        """Protocol B on videos x (see fixed_content)."""
        post = self.encode(x, random=False)
        return self.decode(*fixed_content(self, post["z_mean"], post["f_mean"])[0])

    @torch.no_grad()
    def swap(self, x1, x2):
        """f of x1 with z of x2, and f of x2 with z of x1 (posterior means)."""
        p1, p2 = self.encode(x1, random=False), self.encode(x2, random=False)
        return self.decode(p2["z_mean"], p1["f_mean"]), self.decode(p1["z_mean"], p2["f_mean"])


# ---- generation protocols: the (z, f) to decode, from posterior means ----------------------------
# Any model with decode(z, f) and sample_z_prior(N, T, like=) can be scored with these
# (evaluation.py).
def fixed_motion(z_mean, f_mean):
    """Protocol A (the paper's Table 1): each video's dynamics kept, f ~ N(0, I)."""
    return z_mean, torch.randn_like(f_mean)


def fixed_content(model, z_mean, f_mean):
    """Protocol B: each video's content kept, z a path of the prior: (z, f) of the path's per-step
    means (the paper's B) and of its samples (our Bs)."""
    means, samples = model.sample_z_prior(*z_mean.shape[:2], like=f_mean)
    return (means, f_mean), (samples, f_mean)


def swapped(z_mean, f_mean, perm):
    """The swap: video i's f with video perm[i]'s z."""
    return z_mean[perm], f_mean


# ---- losses --------------------------------------------------------------------------------------
def kl_gaussians(mean_q, logvar_q, mean_p, logvar_p):
    """KL(N(mean_q, e^logvar_q) || N(mean_p, e^logvar_p)), elementwise."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mean_q - mean_p) ** 2) / logvar_p.exp() - 1)


def log_density_gaussian(x, mean, logvar):
    """log N(x; mean, e^logvar), elementwise (the paper repo passes logvar as log std)."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 / logvar.exp())


def nt_xent(a, b, temperature=0.5):
    """NT-Xent (SimCLR): a[i] and b[i] are positives, the other 2B-2 views negatives."""
    B = a.shape[0]
    v = F.normalize(torch.cat([a.flatten(1), b.flatten(1)]), dim=1)
    sim = v @ v.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=sim.device), float("-inf"))
    target = torch.arange(2 * B, device=sim.device).roll(B)  # made on the device: no copy, no sync
    return F.cross_entropy(sim, target)


def mutual_information(f, f_mean, f_logvar, z, z_mean, z_logvar, dataset_size):
    """Minibatch-weighted-sampling estimate of I(f; z_t): mean relu(log q(f, z_t) - log q(f) -
    log q(z_t)), log q(.) ~ logsumexp_j log q(.|x_j) - log(B N)."""
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
    """Tells a video's own (f, z) from f with another's z: its mean logit on own pairs estimates
    I(f; z) (FactorVAE's density-ratio trick) and, unlike the minibatch estimate, does not
    saturate."""

    def __init__(self, f_dim, z_dim, frames, hidden=512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(f_dim + frames * z_dim, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, f, z):  # (B, f_dim), (B, T, z_dim) -> logits (B,)
        return self.net(torch.cat([f, z.flatten(1)], dim=1)).squeeze(1)


def critic_loss(critic, f, z, shift=1):
    """The critic's cross-entropy: (f_i, z_i) are 1, (f_i, z_{i+shift mod B}) are 0."""
    own, other = critic(f, z), critic(f, z.roll(shift, dims=0))
    return (F.binary_cross_entropy_with_logits(own, torch.ones_like(own))
            + F.binary_cross_entropy_with_logits(other, torch.zeros_like(other)))


def cdsvae_loss(out, x, dataset_size, *, weight_rec=1.0, weight_f=1.0, weight_z=1.0, weight_mi=1.0,
                weight_c_aug=10.0, weight_m_aug=10.0, weight_critic=0.0, temperature=0.5, gather=None,
                critic=None):
    """Total loss and every term (per video, in fp32) of CDSVAE.forward's outputs; the defaults are
    the paper's weights. mi_critic: the critic's I(f; z) estimate (the critic is trained apart).
    gather: a local tensor -> the whole batch's across processes, so that the terms comparing
    videos are the whole batch's, and k processes optimise what one does on the whole batch."""
    B = x.shape[0]
    gather = gather or (lambda t: t)
    out = {k: v.float() if torch.is_tensor(v) else {kk: vv.float() for kk, vv in v.items()}
           for k, v in out.items()}
    recon = F.mse_loss(out["recon"], x, reduction="sum") / B
    kld_f = kl_gaussians(out["f_mean"], out["f_logvar"], torch.zeros_like(out["f_mean"]),
                         torch.zeros_like(out["f_logvar"])).sum() / B
    kld_z = kl_gaussians(out["z_mean"], out["z_logvar"], out["z_prior_mean"],
                         out["z_prior_logvar"]).sum() / B
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
    if critic is not None:
        terms["mi_critic"] = critic(whole["f"], whole["z"]).mean()
        total = total + weight_critic * terms["mi_critic"]
    terms["loss"] = total
    return total, terms
