// Schemas of the fastcurv operators. Each op has one implementation file per device
// (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu) and a pure-torch reference in src/fastcurv/ops/.
#include <torch/library.h>

TORCH_LIBRARY(fastcurv, m) {
  // Hessian of softmax cross-entropy w.r.t. the logits applied to tangents:
  // out[b,k,n,:] = scale * p * (w - <p, w>), w = t - t[m], p = probs[b,n,:], t = tangent[b,k,n,:], m the row's
  // most probable class (the first if tied): scale * p * (t - <p, t>) for rows of p summing to 1.
  m.def("softmax_ce_hvp(Tensor probs, Tensor tangent, float scale) -> Tensor");
  // Activation derivatives at the pre-activation z, and the second-order term times the
  // backpropagated gradient g: returns (sigma'(z), sigma''(z) * g). kind: see ops/activation.py.
  m.def("act_derivs(Tensor z, Tensor g, int kind, float slope) -> (Tensor, Tensor)");
  // Backward R-op of an element-wise activation, broadcast over K probes:
  // out[b,k,:] = d1[b,:] * rg[b,k,:] + d2g[b,:] * rz[b,k,:].
  m.def("act_rop_bwd(Tensor d1, Tensor d2g, Tensor rz, Tensor rg) -> Tensor");
  // Input-gradient R-op of a batch-statistics BatchNorm, per group g (= replica x channel) and probe k,
  // with means over the N*S samples: xh, g [N, G, S] (normalized input, output gradient), rg [N, K, G, S]
  // (its tangent), inv [G] (1/sqrt(var+eps)); gamma [G], rgamma [K, G] (weight, weight tangent; both or
  // neither); rxh [N, K, G, S], m2 [K, G] (tangent of xh, mean(dx*xh); both or neither). gx = gamma*g,
  // rgx = gamma*rg + rgamma*g; out [N, K, G, S] = inv*(rgx - mean(rgx) - xh*mean(rgx*xh) - rxh*mean(gx*xh)
  // - xh*mean(gx*rxh)) - inv^2*m2*(gx - mean(gx) - xh*mean(gx*xh)).
  m.def("bn_rop_bwd(Tensor xh, Tensor g, Tensor rg, Tensor inv, Tensor? gamma, Tensor? rgamma, Tensor? rxh, Tensor? m2) -> Tensor");
  // Forward R-op of an eval BatchNorm and the derivative d1 of the activation reading its output, in place
  // on rz [N, K, G, S] (G = replicas x channels): rz <- (scale[g]*rz + rgamma[k,g]*xh + rbeta[k,g]) * d1;
  // returns dot [K, G] = sum over n, s of rz*delta (before the update; [0] without delta). xh, d1, delta
  // [N, G, S]; scale [G]; rgamma, rbeta [K, G]; xh and rgamma both or neither.
  m.def("bn_eval_rop_fwd(Tensor(a!) rz, Tensor scale, Tensor? xh, Tensor? rgamma, Tensor? rbeta, Tensor? d1, Tensor? delta) -> Tensor");
  // Backward R-op of an eval BatchNorm behind an activation derivative d1, u = rd*d1 (rd [N, K, G, S]):
  // returns (sum_u [K, G], sum_uxh [K, G] or [0] without xh), sums over n, s of u and u*xh; with
  // input_grad, rd <- scale[g]*u + crg[k,g]*delta in place. xh, delta, d1 [N, G, S]; scale [G]; crg [K, G];
  // delta and crg both or neither.
  m.def("bn_eval_rop_bwd(Tensor(a!) rd, Tensor scale, Tensor? xh, Tensor? delta, Tensor? crg, Tensor? d1, bool input_grad) -> (Tensor, Tensor)");
  // Hessian-vector product through a network's last Linear layer and its loss (CPU), K probes per replica:
  // a [R, N, I] the layer's input, ra [R, N, K, I] its tangent, weight [R, O, I], dweight [R, K, O, I] and
  // dbias [R, K, O] the probe's blocks, delta [R, N, O] the loss gradient w.r.t. the outputs, probs [R, N, O]
  // softmax probabilities (cross-entropy; None: squared error), d1 [R, N, I] the derivative of a piecewise-
  // linear activation before the layer (or None). rz = a dW^T + ra W^T + db; rd = scale*p*(rz - <p, rz>)
  // (scale*rz without probs); out_w [R, K, O, I] = rd^T a + delta^T ra, out_b [R, K, O] = sum_n rd (written,
  // or added with accumulate); returns the input R-gradient [R, N, K, I] = (rd W + delta dW) * d1.
  m.def("head_hvp(Tensor a, Tensor ra, Tensor weight, Tensor dweight, Tensor? dbias, Tensor? probs, Tensor delta, float scale, Tensor? d1, Tensor(a!) out_w, Tensor(b!)? out_b, bool accumulate) -> Tensor");
  // Exact pairwise agreement counts between integer predictions preds[R, M]: out[i,j] = #{m : preds[i,m] == preds[j,m]}.
  m.def("agreement_counts(Tensor preds) -> Tensor");
  // Linear layer on CSR input rows, R replicas: X [N, in] as (indptr [N+1] int64, indices [nnz] int32 in
  // [0, in), values [nnz]); rows [R, B] int64 picks each replica's minibatch; weight W [R, out, in], or
  // W^T [R, in, out] with weight_t (rows contiguous, any replica stride); bias [R, out].
  // Returns z [R, B, out] = X[rows[r]] @ W[r]^T + bias[r], its column c times out_mask[r, b, c % M] when
  // out_mask [R, B, M] (M dividing out) is given.
  m.def("csr_linear(Tensor indptr, Tensor indices, Tensor values, Tensor rows, Tensor weight, Tensor? bias, bool weight_t, Tensor? out_mask=None) -> Tensor");
  // The same z written into out ([R, B, out], or z^T [R, out, B] with out_t; rows contiguous, any replica
  // stride), or added to it with accumulate (then without bias); out_mask multiplies the result (z only);
  // weight_sums [R, out] or [R, G, out / G] (last dim contiguous) gets W[r] @ 1, written or added likewise.
  m.def("csr_linear_out(Tensor indptr, Tensor indices, Tensor values, Tensor rows, Tensor weight, Tensor? bias, bool weight_t, Tensor(a!) out, bool out_t, bool accumulate, Tensor? out_mask=None, Tensor(b!)? weight_sums=None) -> ()");
  // Its weight gradient X[rows[r]]^T @ grad[r] (grad [R, B, out]) written into out, W-shaped [R, out, in] or
  // with out_t W^T-shaped [R, in, out]; accumulate adds it to out instead of overwriting.
  m.def("csr_linear_wgrad(Tensor indptr, Tensor indices, Tensor values, Tensor rows, Tensor grad, Tensor(a!) out, bool out_t, bool accumulate) -> ()");
  // CSR form (indptr int64, indices int32, values) of x [G, M, F]'s nonzeros, or of the entries where mask
  // (bool, x's shape) is true: of x.reshape(G*M, F), or with transpose of the stacked x[g]^T [G*F, M].
  m.def("csr_from_dense(Tensor x, Tensor? mask, bool transpose) -> (Tensor, Tensor, Tensor)");
  // The forward product of P dense rows per minibatch row, each masked to the pattern of its CSR row (the
  // CSR values are not read): out[r, b, p] (+)= (dense[r, b, p] * 1[pattern of X row rows[r, b]]) @ W[r]^T;
  // dense [R, B, P, in], out [R, B, P, out] (last three dims contiguous, any replica stride); the result
  // (after accumulating) times out_mask [R, B, out] when given.
  m.def("csr_masked_linear_out(Tensor indptr, Tensor indices, Tensor rows, Tensor dense, Tensor weight, bool weight_t, Tensor(a!) out, bool accumulate, Tensor? out_mask=None) -> ()");
  // A convolution at chosen output positions, one set per output channel (CPU): cols [N, L, T] the input's
  // patches (L output positions, T = C_in*kh*kw taps; rows contiguous), pos [N, G, S] int64 positions in
  // [0, L) per output channel g, weight [G, K, T] (K weights per channel). Returns out [N, K, G, S] with
  // out[n, k, g, s] = sum_t cols[n, pos[n, g, s], t] * weight[g, k, t].
  m.def("sampled_conv(Tensor cols, Tensor pos, Tensor weight) -> Tensor");
  // Its weight gradient from grad [N, K, G, S]: out [G, K, T] (contiguous) = sum_{n, s} grad[n, k, g, s] *
  // cols[n, pos[n, g, s], t], written, or added with accumulate.
  m.def("sampled_conv_wgrad(Tensor cols, Tensor pos, Tensor grad, Tensor(a!) out, bool accumulate) -> ()");
  // A grouped stride-1 convolution (CPU): x [B, G, C1, C2, H, W] (B samples, G groups of C = C1*C2 input
  // channels; any strides), weight [G, O, C, kh, kw]; padding (top, bottom, left, right); out [B, G, O1, O2,
  // H_out, W_out] (O = O1*O2; any strides) gets, or with accumulate adds, out[b, g, o, y, x] = sum_{c, ty, tx}
  // weight[g, o, c, ty, tx] * x[b, g, c, y + ty - top, x + tx - left] (zero outside x).
  m.def("group_conv(Tensor x, Tensor weight, Tensor(a!) out, int[4] padding, bool accumulate) -> ()");
  // Its weight gradient from grad [B, G, O1, O2, H_out, W_out]: out [G, O1, O2, C1, C2, kh, kw] (any strides)
  // gets, or adds, sum_{b, y, x} grad[b, g, o, y, x] * x[b, g, c, y + ty - top, x + tx - left].
  m.def("group_conv_wgrad(Tensor x, Tensor grad, Tensor(a!) out, int[4] padding, bool accumulate) -> ()");
  // The x86 vector level the CPU kernels with per-ISA variants run: 2 AVX-512, 1 AVX2 + FMA, 0 baseline
  // (capped by FASTCURV_CPU_LEVEL; read at each call).
  m.def("cpu_level() -> int");
}
