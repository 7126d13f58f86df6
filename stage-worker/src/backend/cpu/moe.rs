//! The CPU's router and mixture-of-experts step (§3.6, §3.7).
//!
//! The router picks each token's top-k experts from its own logits. The MoE step gathers, for
//! each expert in ascending id, the tokens routed to it, runs its two MXFP4 products and the
//! SwiGLU over them (a batched product: its rows do not depend on each other, see
//! `kernels.rs`), and keeps each routed output by route slot; then every token sums its own
//! experts' outputs, weighted, in ascending expert id, into one f32 accumulator that is added
//! to the residual. So a token's result does not depend on which other tokens chose the same
//! experts.

use gptossd_shared::checkpoint::Mapped;
use gptossd_shared::mxfp4::Mxfp4Experts;

use super::rows::swiglu;
use super::{grow, matmul_mxfp4, Mxfp4Rows, ThreadPool};

/// One layer's experts as the checkpoint maps them (no copy).
pub struct CpuExperts {
    pub(super) gate_up: Mxfp4Experts,
    pub(super) gate_up_bias: Mapped<u16>,
    pub(super) down: Mxfp4Experts,
    pub(super) down_bias: Mapped<u16>,
}

/// Per token, `top_k` (expert, weight) pairs sorted by expert id.
#[derive(Default)]
pub struct CpuRoutes {
    pub(super) top_k: usize,
    pub(super) pairs: Vec<(usize, f32)>,
}

/// Router (§3.6): the top-k logits (ties → lower id), softmax over those k only; appends the
/// k (expert, weight) pairs to `routes`, sorted by expert id. No allocation: the selection is
/// done in place in `routes`' tail.
pub(super) fn route(logits: &[f32], top_k: usize, routes: &mut Vec<(usize, f32)>) {
    let start = routes.len();
    // Insertion into a descending top-k list held in routes[start..] as (expert, logit).
    for (e, &l) in logits.iter().enumerate() {
        let better = |&(_, other): &(usize, f32)| l.total_cmp(&other).is_gt();
        let held = routes.len() - start;
        if held < top_k {
            let at = routes[start..]
                .iter()
                .position(better)
                .map_or(routes.len(), |p| start + p);
            routes.insert(at, (e, l));
        } else if let Some(p) = routes[start..].iter().position(better) {
            routes.insert(start + p, (e, l));
            routes.pop();
        }
    }
    let max = routes[start].1;
    let mut sum = 0f32;
    for r in &mut routes[start..] {
        r.1 = (r.1 - max).exp();
        sum += r.1;
    }
    for r in &mut routes[start..] {
        r.1 /= sum;
    }
    routes[start..].sort_unstable_by_key(|&(e, _)| e);
}

/// Buffers of the MoE step, grown to the largest step seen.
#[derive(Default)]
pub(super) struct MoeScratch {
    /// Tokens routed to the current expert: (token, route slot).
    members: Vec<(usize, usize)>,
    gathered: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    expert_out: Vec<f32>,
    /// `[tokens × top_k × hidden]`: each routed expert's output, by route slot.
    routed: Vec<f32>,
}

/// One MoE step: `x` is the normed residual `[tokens × hidden]`, `residual` gets the mixture.
pub(super) struct Moe<'a> {
    pub x: &'a [f32],
    pub tokens: usize,
    pub routes: &'a CpuRoutes,
    pub experts: &'a CpuExperts,
    pub swiglu_limit: f32,
    pub pool: &'a ThreadPool,
    pub residual: &'a mut [f32],
}

pub(super) fn moe(m: Moe<'_>, s: &mut MoeScratch) {
    let (gu, dn) = (&m.experts.gate_up, &m.experts.down);
    let h = dn.rows;
    let inter = dn.cols;
    let top_k = m.routes.top_k;
    let n = m.tokens;
    let routes = &m.routes.pairs;
    let routed = grow(&mut s.routed, n * top_k * h);
    for expert in 0..gu.experts {
        s.members.clear();
        for (slot, &(ex, _)) in routes.iter().enumerate() {
            if ex == expert {
                s.members.push((slot / top_k, slot));
            }
        }
        let rows = s.members.len();
        if rows == 0 {
            continue;
        }
        let gathered = grow(&mut s.gathered, rows * h);
        for (row, &(tok, _)) in gathered.chunks_exact_mut(h).zip(&s.members) {
            row.copy_from_slice(&m.x[tok * h..(tok + 1) * h]);
        }
        let gate_up = grow(&mut s.gate_up, rows * 2 * inter);
        let gu_rows = Mxfp4Rows {
            blocks: expert_slice(&gu.blocks, expert, gu.rows * gu.cols / 2),
            scales: expert_slice(&gu.scales, expert, gu.rows * gu.cols / 32),
            rows: gu.rows,
            k_dim: gu.cols,
        };
        let gu_bias = &m.experts.gate_up_bias[expert * 2 * inter..(expert + 1) * 2 * inter];
        matmul_mxfp4(m.pool, gathered, rows, gu_rows, Some(gu_bias), gate_up);
        let act = grow(&mut s.act, rows * inter);
        for (pairs, a) in gate_up
            .chunks_exact(2 * inter)
            .zip(act.chunks_exact_mut(inter))
        {
            swiglu(pairs, m.swiglu_limit, a);
        }
        let down_rows = Mxfp4Rows {
            blocks: expert_slice(&dn.blocks, expert, dn.rows * dn.cols / 2),
            scales: expert_slice(&dn.scales, expert, dn.rows * dn.cols / 32),
            rows: dn.rows,
            k_dim: dn.cols,
        };
        let down_bias = &m.experts.down_bias[expert * h..(expert + 1) * h];
        let expert_out = grow(&mut s.expert_out, rows * h);
        matmul_mxfp4(m.pool, act, rows, down_rows, Some(down_bias), expert_out);
        for (row, &(_, slot)) in expert_out.chunks_exact(h).zip(&s.members) {
            routed[slot * h..(slot + 1) * h].copy_from_slice(row);
        }
    }
    // Weighted sum in ascending expert id (routes are sorted so), then the residual add.
    for (tok, xr) in m.residual.chunks_exact_mut(h).enumerate().take(n) {
        for d in 0..h {
            let mut acc = 0f32;
            for j in 0..top_k {
                let slot = tok * top_k + j;
                acc += routes[slot].1 * routed[slot * h + d];
            }
            xr[d] += acc;
        }
    }
}

fn expert_slice(data: &[u8], expert: usize, per_expert: usize) -> &[u8] {
    &data[expert * per_expert..(expert + 1) * per_expert]
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn router_takes_top_k_then_softmax_sorted_by_expert() {
        let mut routes = vec![(99, 0.0)];
        route(&[0.5, 2.0, -1.0, 2.0, 1.0], 3, &mut routes);
        assert_eq!(routes[0], (99, 0.0), "earlier routes are kept");
        let got: Vec<usize> = routes[1..].iter().map(|r| r.0).collect();
        // Ties at 2.0 keep both (ids 1 and 3); then 1.0 (id 4); sorted by id.
        assert_eq!(got, vec![1, 3, 4]);
        let e = [1.0f32, 1.0, (-1.0f32).exp()];
        let sum: f32 = e.iter().sum();
        assert!((routes[1].1 - e[0] / sum).abs() < 1e-7);
        assert!((routes[3].1 - e[2] / sum).abs() < 1e-7);
        let mut tie = Vec::new();
        route(&[1.0, 1.0, 1.0], 2, &mut tie);
        assert_eq!(
            tie.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![0, 1],
            "ties go to the lower id"
        );
    }
}
