//! Routing metrics and exports on a hand-made routing table whose answers are worked out by hand.
use helpers::interp::{self, metrics, plot, Routing, UsageRow};
use tch::Tensor;

/// E = 4, K = 2, MoE layers 1..=3 (a dense layer 0 first), 2 sequences of 2 tokens.
/// Token t chooses at layers 1, 2, 3:
///   t0: {0,1} {1,2} {1,3}     t1: {2,3} {0,1} {0,2}
///   t2: {0,1} {0,1} {0,1}     t3: {3,2} {3,2} {1,0}
fn table() -> Routing {
    let mut r = Routing::new(4, 2, vec![1, 2, 3], 2);
    let tokens = Tensor::from_slice(&[10i64, 11, 10, 12]).view([2, 2]);
    let layers = [[0i64, 1, 2, 3, 0, 1, 3, 2], [1, 2, 0, 1, 0, 1, 3, 2], [1, 3, 0, 2, 0, 1, 1, 0]];
    let experts: Vec<Tensor> = layers.iter().map(|l| Tensor::from_slice(l).view([4, 2])).collect();
    let weights: Vec<Tensor> = (0..3).map(|l| Tensor::from_slice(&[0.6f32, 0.4, 0.7, 0.3, 0.5, 0.5, 0.9, 0.1]).view([4, 2]) + l as f64).collect();
    r.push(&tokens, experts.iter().zip(&weights)).unwrap();
    r
}

#[test]
fn usage_entropy_and_balance_violation() {
    let r = table();
    assert_eq!(r.n_tokens(), 4);
    assert_eq!(r.n_sequences(), 2);
    assert_eq!(r.usage(), vec![vec![2, 2, 2, 2], vec![2, 3, 2, 1], vec![3, 3, 1, 1]]);
    assert!((interp::usage_entropy(&[2, 2, 2, 2]) - 4f64.ln()).abs() < 1e-12);
    let p = [0.25f64, 0.375, 0.25, 0.125];
    let h: f64 = -p.iter().map(|p| p * p.ln()).sum::<f64>();
    assert!((interp::usage_entropy(&[2, 3, 2, 1]) - h).abs() < 1e-12);
    assert_eq!(interp::usage_entropy(&[8, 0, 0, 0]), 0.0);
    assert!(interp::usage_entropy(&[0, 0]).is_nan());
    assert_eq!(interp::max_violation(&[2, 2, 2, 2]), 0.0);
    assert_eq!(interp::max_violation(&[2, 3, 2, 1]), 0.5);
    assert_eq!(interp::max_violation(&[8, 0, 0, 0]), 3.0); // collapsed: E - 1
}

#[test]
fn path_consistency_and_stay_lengths() {
    let r = table();
    // 1 -> 2: t0 shares 1, t1 shares nothing, t2 shares both, t3 shares both; 2 -> 3: t3 shares nothing.
    assert_eq!(r.path_consistency(), vec![0.75, 0.75]);
    // Runs (length: count): t0 e1 3, e0/e2/e3 1; t1 e2 1+1, e3 1, e0 2, e1 1; t2 e0 3, e1 3; t3 e3 2, e2 2, e1 1, e0 1.
    let stay = r.stay();
    assert_eq!(stay.runs, vec![0, 9, 3, 3]);
    assert!((stay.mean - 24.0 / 15.0).abs() < 1e-12);
}

#[test]
fn transitions_count_pairs_of_chosen_experts() {
    let r = table();
    let all = r.transitions(0, None).unwrap();
    assert_eq!(all, vec![vec![1, 2, 1, 0], vec![1, 2, 1, 0], vec![1, 1, 1, 1], vec![1, 1, 1, 1]]);
    // Only token id 10 (t0 and t2).
    let some = r.transitions(0, Some(&[10])).unwrap();
    assert_eq!(some, vec![vec![1, 2, 1, 0], vec![1, 2, 1, 0], vec![0; 4], vec![0; 4]]);
    let err = r.transitions(2, None).unwrap_err().to_string();
    assert!(err.contains("no MoE layer after position 2"), "{err}");
}

#[test]
fn summary_names_layers_by_decoder_index() {
    let s = table().summary();
    assert!((s["usage_entropy.1"] - 4f64.ln()).abs() < 1e-12);
    assert_eq!(s["max_vio.2"], 0.5);
    assert_eq!(s["max_vio_mean"], (0.0 + 0.5 + 0.5) / 3.0);
    assert_eq!(s["consistency.1"], 0.75);
    assert!(!s.contains_key("consistency.3"), "the last MoE layer has no successor");
    assert!((s["stay_mean"] - 1.6).abs() < 1e-12);
    assert!((s["usage_entropy_norm"] - s["usage_entropy_mean"] / 4f64.ln()).abs() < 1e-12);
    let t = metrics::table(&s, &[1, 2, 3], 4, 2);
    assert_eq!(t.lines().count(), 1 + 3 + 1, "{t}");
    assert!(t.lines().nth(1).unwrap().starts_with("    1 |                1.000 |  0.000 |"), "{t}");
    assert!(t.lines().nth(3).unwrap().contains("NaN"), "layer 3 has no next layer: {t}");
}

#[test]
fn chance_consistency_of_random_routing() {
    // Two random 2-subsets of 4 experts miss each other only when the second is the complement: 1 of 6.
    assert!((metrics::chance_consistency(4, 2) - 5.0 / 6.0).abs() < 1e-12);
    assert_eq!(metrics::chance_consistency(64, 1), 1.0 / 64.0);
    assert_eq!(metrics::chance_consistency(3, 2), 1.0);
}

#[test]
fn router_cosine_similarity() {
    let w = Tensor::from_slice(&[1f32, 0., 0., 1., 1., 1.]).view([3, 2]);
    let m = metrics::router_cosine(&w).unwrap();
    let s = std::f64::consts::FRAC_1_SQRT_2;
    for (i, row) in [[1.0, 0.0, s], [0.0, 1.0, s], [s, s, 1.0]].iter().enumerate() {
        for j in 0..3 {
            assert!((m[i][j] - row[j]).abs() < 1e-6, "cos[{i}][{j}] = {}", m[i][j]);
        }
    }
    let (mean, max) = metrics::off_diagonal(&m);
    assert!((mean - 2.0 * s / 3.0).abs() < 1e-6 && (max - s).abs() < 1e-6);
    let sum = metrics::router_summary([(4, &w)]).unwrap();
    assert!((sum["router_cos_max.4"] - s).abs() < 1e-6);
}

#[test]
fn push_rejects_mismatched_shapes() {
    let mut r = Routing::new(4, 2, vec![0, 1], 2);
    let tokens = Tensor::from_slice(&[1i64, 2]).view([1, 2]);
    let idx = Tensor::from_slice(&[0i64, 1, 2, 3]).view([2, 2]);
    let w = Tensor::ones([2, 2], (tch::Kind::Float, tch::Device::Cpu));
    let err = r.push(&tokens, [(&idx, &w)]).unwrap_err().to_string();
    assert!(err.contains("routing for 1 MoE layers, the table has 2"), "{err}");
    let bad = Tensor::from_slice(&[0i64, 1, 2]).view([3, 1]);
    let err = r.push(&tokens, [(&bad, &w), (&idx, &w)]).unwrap_err().to_string();
    assert!(err.contains("must be (B*T, K) = (2, 2)"), "{err}");
    let out_of_range = Tensor::from_slice(&[0i64, 1, 2, 9]).view([2, 2]);
    let err = r.push(&tokens, [(&idx, &w), (&out_of_range, &w)]).unwrap_err().to_string();
    assert!(err.contains("layer 1: an expert id is outside 0..4"), "{err}");
    assert_eq!(r, Routing::new(4, 2, vec![0, 1], 2), "a rejected batch leaves the table unchanged");
}

#[test]
fn long_format_csv_and_parquet_hold_the_same_rows() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let r = table();
    let dir = tempfile::tempdir().unwrap();
    let (pq, csv) = r.export(dir.path()).unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "sequence_ix,token_ix,token_id,layer_ix,topk_ix,expert,weight");
    assert_eq!(lines.len(), 1 + 4 * 3 * 2);
    // Ordered by sequence, token, layer, slot: t0 at layer 1 chose 0 (0.6) then 1 (0.4); t3 = sequence 1, token 1.
    assert_eq!(&lines[1..3], &["0,0,10,1,0,0,0.6", "0,0,10,1,1,1,0.4"]);
    assert_eq!(lines[24], "1,1,12,3,1,0,2.1");
    let reader = SerializedFileReader::new(std::fs::File::open(&pq).unwrap()).unwrap();
    let names: Vec<String> = reader.metadata().file_metadata().schema_descr().columns().iter().map(|c| c.name().to_string()).collect();
    assert_eq!(names, interp::export::COLUMNS);
    let rows: Vec<String> = reader
        .get_row_iter(None)
        .unwrap()
        .map(|row| {
            let row = row.unwrap();
            let v: Vec<String> = row.get_column_iter().map(|(_, f)| f.to_string()).collect();
            v.join(",")
        })
        .collect();
    let csv_rows: Vec<String> = lines[1..].iter().map(|l| l.to_string()).collect();
    assert_eq!(rows.len(), csv_rows.len());
    for (p, c) in rows.iter().zip(&csv_rows) {
        let (p, c): (Vec<f64>, Vec<f64>) = (p.split(',').map(|x| x.parse().unwrap()).collect(), c.split(',').map(|x| x.parse().unwrap()).collect());
        for (a, b) in p.iter().zip(&c) {
            assert!((a - b).abs() < 1e-6, "parquet {p:?} vs csv {c:?}");
        }
    }
    assert!(!dir.path().read_dir().unwrap().any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tmp")));
}

fn png_size(path: &std::path::Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
    (u32::from_be_bytes(b[16..20].try_into().unwrap()), u32::from_be_bytes(b[20..24].try_into().unwrap()))
}

#[test]
fn plots_and_usage_history() {
    let r = table();
    let dir = tempfile::tempdir().unwrap();
    plot::usage_heatmap(&r.usage(), &r.layers, &dir.path().join("usage.png"), "test").unwrap();
    plot::transition_heatmap(&r.transitions(0, None).unwrap(), &dir.path().join("trans.png"), "layer 1 -> 2").unwrap();
    assert!(png_size(&dir.path().join("usage.png")).0 >= 620, "room for the colour bar");
    assert!(png_size(&dir.path().join("trans.png")).1 >= 240);

    let path = dir.path().join("expert_usage.jsonl");
    let rows: Vec<UsageRow> =
        (1..=3).map(|s| UsageRow { step: s, tokens: 100 * s, layers: vec![1, 2], counts: vec![vec![s as f64, 1.0], vec![1.0, 1.0]] }).collect();
    let mut text: String = rows.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
    text.push_str("{\"step\": 4, \"tok"); // a torn last line from a killed run
    std::fs::write(&path, text).unwrap();
    let back = interp::read_usage(&path).unwrap();
    assert_eq!(back, rows);
    plot::usage_over_training(&back, &dir.path().join("over.png"), "test").unwrap();
    assert_eq!(png_size(&dir.path().join("over.png")), (2 * 520, 50 + 340), "one panel per MoE layer, side by side");
    let err = plot::usage_over_training(&[], &dir.path().join("x.png"), "test").unwrap_err().to_string();
    assert!(err.contains("no expert usage history"), "{err}");
}

#[test]
fn the_metrics_table_says_the_last_layer_has_no_next() {
    let m: std::collections::BTreeMap<String, f64> =
        [("consistency.1", 0.5), ("consistency.2", 0.25), ("consistency.3", f64::NAN)].iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let t = metrics::table(&m, &[1, 2, 3], 4, 2);
    let rows: Vec<&str> = t.lines().collect();
    assert!(rows[1].contains("0.500") && rows[2].contains("0.250"), "{t}");
    assert_eq!(rows[3].split('|').nth(3).unwrap().trim(), "(last MoE layer)", "{t}");
}

#[test]
fn an_expert_named_twice_in_a_tokens_slots_counts_once_per_layer() {
    // A tree's two paths share their first edge: slots (0, 2, 0, 3) name expert 0 twice, at both
    // MoE layers, so the token keeps expert 0 for a run of 2 layers (not 4), and 2 and 3 for 1 each.
    let mut r = Routing::new(4, 4, vec![0, 1], 1);
    let tokens = Tensor::from_slice(&[7i64]).view([1, 1]);
    let experts = [Tensor::from_slice(&[0i64, 2, 0, 3]).view([1, 4]), Tensor::from_slice(&[0i64, 1, 0, 1]).view([1, 4])];
    let weights: Vec<Tensor> = (0..2).map(|_| Tensor::from_slice(&[0.5f32, 0.2, 0.4, 0.1]).view([1, 4])).collect();
    r.push(&tokens, experts.iter().zip(&weights)).unwrap();
    let stay = r.stay();
    assert_eq!(stay.runs, vec![0, 3, 1], "runs of 1 layer: 2, 3 (layer 0) and 1 (layer 1); of 2 layers: 0");
}

#[test]
fn tree_metrics_on_a_hand_made_routing() {
    use helpers::interp::tree::Tree;
    // b = 2, n = 2: experts 0, 1 (depth 1), 2..=5 (depth 2; 2, 3 under expert 0, 4, 5 under 1).
    // K = 1 path per token; four tokens at one MoE layer (decoder layer 5).
    let tree = Tree { b: 2, n: 2 };
    assert_eq!((tree.experts(), tree.offset(1), tree.offset(2)), (6, 0, 2));
    let mut r = Routing::new(6, 2, vec![5], 4);
    let tokens = Tensor::from_slice(&[1i64, 2, 3, 4]).view([1, 4]);
    // Paths: (0, 2), (0, 2), (0, 3), (1, 5): leaves 0, 0, 1, 3.
    let experts = [Tensor::from_slice(&[0i64, 2, 0, 2, 0, 3, 1, 5]).view([4, 2])];
    let weights = [Tensor::ones([4, 2], (tch::Kind::Float, tch::Device::Cpu))];
    r.push(&tokens, experts.iter().zip(&weights)).unwrap();
    let m = tree.metrics(&r).unwrap();
    let h = |p: &[f64]| -p.iter().filter(|&&x| x > 0.0).map(|x| x * x.ln()).sum::<f64>();
    let close = |k: &str, v: f64| assert!((m[k] - v).abs() < 1e-12, "{k}: {} vs {v}", m[k]);
    close("tree.usage_entropy.1.5", h(&[0.75, 0.25]) / 2f64.ln());
    close("tree.usage_entropy.2.5", h(&[0.5, 0.25, 0.0, 0.25]) / 4f64.ln());
    // Under expert 0 (3 tokens): children 2, 2, 3 -> (2/3)^2 + (1/3)^2 = 5/9; under 1 (1 token): 1.
    close("tree.agreement.1.5", (3.0 * 5.0 / 9.0 + 1.0) / 4.0);
    close("tree.path_entropy.5", h(&[0.5, 0.25, 0.0, 0.25]) / 4f64.ln());
    assert!(tree.metrics(&Routing::new(5, 2, vec![0], 1)).is_err(), "5 experts are not a b = 2, n = 2 tree");
}
