//! Choosing the next token from a model's logits: greedy, or temperature with top-k and top-p
//! (nucleus) filtering. The notebook's generation loop (with its KV cache) calls [`next_token`].
use tch::{Kind, Tensor};

/// How to pick tokens. `temperature == 0` is greedy (argmax); `top_k == 0` and `top_p >= 1` turn
/// those filters off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    pub top_k: i64,
    pub top_p: f64,
}

/// `greedy`, or `temperature 0.8, top-k 50, top-p 0.95` (the filters that are on).
impl std::fmt::Display for Sampling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.temperature == 0.0 {
            return write!(f, "greedy");
        }
        write!(f, "temperature {}", self.temperature)?;
        if self.top_k > 0 {
            write!(f, ", top-k {}", self.top_k)?;
        }
        if self.top_p < 1.0 {
            write!(f, ", top-p {}", self.top_p)?;
        }
        Ok(())
    }
}

impl Sampling {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0 }
    }
}

/// The next token for `logits` (V,) (any float dtype), drawn with the global RNG. One host sync
/// (the returned id).
pub fn next_token(logits: &Tensor, s: &Sampling) -> i64 {
    tch::no_grad(|| {
        let logits = logits.to_kind(Kind::Float).flatten(0, -1); // (V,)
        if s.temperature <= 0.0 {
            return logits.argmax(0, false).int64_value(&[]);
        }
        let v = logits.size()[0];
        let k = if s.top_k > 0 { s.top_k.min(v) } else { v };
        // Top-k keeps the k largest (sorted, descending), so top-p can work on the same slice.
        let (vals, ids) = (logits / s.temperature).topk(k, 0, true, true); // (k,), (k,)
        let mut probs = vals.softmax(0, Kind::Float);
        if s.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            let before = probs.cumsum(0, Kind::Float) - &probs; // mass of the tokens ranked above
            probs = probs.masked_fill(&before.gt(s.top_p), 0.0);
        }
        let choice = probs.multinomial(1, false); // (1,), multinomial renormalises
        ids.index_select(0, &choice).int64_value(&[0])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_reads_as_its_settings() {
        assert_eq!(Sampling::greedy().to_string(), "greedy");
        assert_eq!(Sampling { temperature: 0.8, top_k: 50, top_p: 0.95 }.to_string(), "temperature 0.8, top-k 50, top-p 0.95");
        assert_eq!(Sampling { temperature: 1.0, top_k: 0, top_p: 1.0 }.to_string(), "temperature 1", "filters that are off are not named");
    }

    #[test]
    fn greedy_top_k_and_top_p_pick_only_allowed_tokens() {
        tch::manual_seed(0);
        let logits = Tensor::from_slice(&[0.0f32, 3.0, 2.9, -1.0, 1.0]);
        assert_eq!(next_token(&logits, &Sampling::greedy()), 1);
        for _ in 0..50 {
            let t = next_token(&logits, &Sampling { temperature: 1.0, top_k: 2, top_p: 1.0 });
            assert!(t == 1 || t == 2, "top-2 drew {t}");
            // p(1) ~ 0.47 < 0.5, so top-p 0.5 must keep tokens 1 and 2 only.
            let t = next_token(&logits, &Sampling { temperature: 1.0, top_k: 0, top_p: 0.5 });
            assert!(t == 1 || t == 2, "top-p drew {t}");
            let t = next_token(&logits, &Sampling { temperature: 1.0, top_k: 0, top_p: 0.3 });
            assert_eq!(t, 1, "top-p 0.3 keeps only the most likely token");
        }
    }
}
