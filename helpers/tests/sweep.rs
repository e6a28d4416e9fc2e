//! Sweeps: grid parsing and its errors, the order and names of the points, and the report (rows,
//! CSV, markdown, plots) collected from hand-made run directories in every state a run can be in.
use helpers::sweep::{self, Axis, Point, Status, Sweep};
use serde_json::json;
use std::path::Path;

fn axis(key: &str, values: &[&str]) -> Axis {
    Axis { key: key.into(), values: values.iter().map(|v| v.to_string()).collect() }
}

fn err(specs: &[&str]) -> String {
    format!("{:#}", sweep::parse_grid(specs).unwrap_err())
}

#[test]
fn grid_parses_json_and_bare_words() {
    let g = sweep::parse_grid(&["model.num_hidden_layers=2,4", " train.lr = 1e-3, 3e-4 ", "train.optimizer=adamw,\"muon\""]).unwrap();
    assert_eq!(
        g,
        vec![axis("model.num_hidden_layers", &["2", "4"]), axis("train.lr", &["1e-3", "3e-4"]), axis("train.optimizer", &["adamw", "\"muon\""])]
    );
    assert_eq!(sweep::parse_grid::<&str>(&[]).unwrap(), vec![]);
}

#[test]
fn bad_grids_say_what_is_wrong() {
    assert!(err(&["model.num_hidden_layers"]).contains("not of the form section.field=v1,v2"), "{}", err(&["model.num_hidden_layers"]));
    assert!(err(&["model.num_hidden_layers="]).contains("empty value"));
    assert!(err(&["model.num_hidden_layers=2,,4"]).contains("empty value"));
    assert!(err(&["model.num_hidden_layers=2,4,"]).contains("empty value"));
    assert!(err(&["optim.lr=1,2"]).contains("unknown config section \"optim\"; expected one of [\"model\", \"train\"]"));
    assert!(err(&["num_hidden_layers=2"]).contains("needs a section prefix"));
    assert!(err(&["model.=2"]).contains("is not a config field name"));
    let dup = err(&["model.num_experts=4,8", "model.num_hidden_layers=2", "model.num_experts=16"]);
    assert!(dup.contains("model.num_experts appears in two grids"), "{dup}");
    assert!(err(&["model.num_experts=4,8,4"]).contains("value 4 appears twice"));
    assert!(err(&["train.sample_prompt=\"a b\""]).contains("contains whitespace"));
    assert!(err(&["train.sample_prompt=\"a,b\""]).contains("does not parse"));
    let g = vec![axis("model.num_hidden_layers", &["2", "4"])];
    assert!(sweep::check_set("train.lr=1e-3 model.hidden_size=64", &g).is_ok());
    let both = format!("{:#}", sweep::check_set("train.lr=1e-3 model.num_hidden_layers=3", &g).unwrap_err());
    assert!(both.contains("model.num_hidden_layers is both in --set and in a --grid"), "{both}");
    assert!(format!("{:#}", sweep::check_set("lr=1", &g).unwrap_err()).contains("in --set"));
}

#[test]
fn expansion_order_names_and_overrides() {
    let g = vec![axis("model.num_hidden_layers", &["2", "4"]), axis("model.num_experts", &["4", "8", "16"])];
    let points = sweep::expand(&g);
    let names: Vec<String> = points.iter().map(Point::name).collect();
    // The first axis varies slowest: nested loops over the grid as written.
    assert_eq!(
        names,
        [
            "num_hidden_layers=2,num_experts=4",
            "num_hidden_layers=2,num_experts=8",
            "num_hidden_layers=2,num_experts=16",
            "num_hidden_layers=4,num_experts=4",
            "num_hidden_layers=4,num_experts=8",
            "num_hidden_layers=4,num_experts=16"
        ]
    );
    assert_eq!(points[4].overrides(), "model.num_hidden_layers=4 model.num_experts=8");
    assert_eq!(sweep::expand(&[]).iter().map(Point::name).collect::<Vec<_>>(), ["base"]);
    // Filesystem-safe names; the section is kept only when two axes share a field name.
    let odd = sweep::expand(&[axis("train.data", &["data/shards/x"]), axis("train.sample_prompt", &["\"ROMEO:\""])]);
    assert_eq!(odd[0].name(), "data=data_shards_x,sample_prompt=_ROMEO__");
    let clash = sweep::expand(&[axis("model.seed", &["1"]), axis("train.seed", &["2"]), axis("train.lr", &["1e-3"])]);
    assert_eq!(clash[0].name(), "model.seed=1,train.seed=2,lr=1e-3");
    let s = Sweep { group: "g".into(), notebook: "nb".into(), preset: None, steps: None, set: " train.lr=1e-3 ".into(), grid: g };
    assert_eq!(s.moe_set(&points[0]), "train.lr=1e-3 model.num_hidden_layers=2 model.num_experts=4");
}

/// A finished run of the notebook: the files it writes, with the numbers that matter here.
fn fake_run(dir: &Path, params: i64, active: i64, val: &[(i64, f64)], train_loss: f64, acc: f64) {
    std::fs::create_dir_all(dir).unwrap();
    let tokens = val.last().unwrap().0;
    let metrics: String =
        val.iter().enumerate().map(|(i, (t, v))| format!("{}\n", json!({"step": i, "tokens": t, "val.loss": v, "train.loss": v + 0.1}))).collect();
    std::fs::write(dir.join("metrics.jsonl"), format!("{metrics}{{\"step\": 99, \"tokens\": 1, \"train.loss\": 1.0}}\n")).unwrap();
    let last = val.last().unwrap().1;
    let results = json!({"step": val.len() - 1, "tokens": tokens,
        "final": {"train.loss": train_loss, "val.loss": last, "val.accuracy": acc, "tokens_per_s": 1234.5, "mfu": 0.01}});
    std::fs::write(dir.join("training_results.json"), results.to_string()).unwrap();
    let summary = json!({"parameters": params, "active_parameters": active, "tokens": tokens, "train_seconds": 12.5, "val_loss_final": last});
    std::fs::write(dir.join("summary.json"), summary.to_string()).unwrap();
}

fn png_size(path: &Path) -> (u32, u32) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).unwrap(); // decodes every pixel, not only the header
    (frame.width, frame.height)
}

#[test]
fn report_collects_rows_table_and_plots() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    let grid = vec![axis("model.num_hidden_layers", &["1", "2"]), axis("model.num_experts", &["4", "8"])];
    let sweep =
        Sweep { group: "sweep-test".into(), notebook: "nb.ipynb".into(), preset: Some("cpu".into()), steps: Some(2), set: String::new(), grid };
    sweep.save(out).unwrap();
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(saved["runs"][3], "num_hidden_layers=2,num_experts=8");
    assert_eq!(Sweep::load(out).unwrap(), sweep);

    // L1 E4 and L2 E4 finished; L1 E8 crashed after one evaluation; L2 E8 never started. A run
    // that wrote its results but then exited with an error (sweep_run.json) is failed too.
    fake_run(&out.join("num_hidden_layers=1,num_experts=4"), 1_000_000, 600_000, &[(0, 10.9), (256, 9.5), (512, 8.25)], 8.5, 0.125);
    fake_run(&out.join("num_hidden_layers=2,num_experts=4"), 3_000_000, 1_200_000, &[(0, 10.9), (256, 9.0), (512, 7.75)], 8.0, 0.25);
    let crashed = out.join("num_hidden_layers=1,num_experts=8");
    std::fs::create_dir_all(&crashed).unwrap();
    std::fs::write(crashed.join("metrics.jsonl"), "{\"step\": 0, \"tokens\": 0, \"val.loss\": 10.8}\n{\"step\": 1, \"tok").unwrap();
    let rows = sweep::collect(out, &sweep);
    let got: Vec<(&str, Status, Option<i64>, Option<f64>)> = rows.iter().map(|r| (r.name.as_str(), r.status, r.parameters, r.val_loss)).collect();
    assert_eq!(
        got,
        [
            ("num_hidden_layers=1,num_experts=4", Status::Ok, Some(1_000_000), Some(8.25)),
            ("num_hidden_layers=1,num_experts=8", Status::Failed, None, None),
            ("num_hidden_layers=2,num_experts=4", Status::Ok, Some(3_000_000), Some(7.75)),
            ("num_hidden_layers=2,num_experts=8", Status::Missing, None, None),
        ]
    );
    let r = &rows[2];
    assert_eq!((r.active_parameters, r.tokens, r.train_loss, r.val_accuracy), (Some(1_200_000), Some(512), Some(8.0), Some(0.25)));
    assert_eq!((r.tokens_per_s, r.train_seconds), (Some(1234.5), Some(12.5)));
    assert_eq!(r.val_curve, [(0.0, 10.9), (256.0, 9.0), (512.0, 7.75)], "validation rows only, against tokens");
    assert_eq!(rows[1].val_curve, [(0.0, 10.8)], "a torn last line is skipped");
    std::fs::write(out.join("num_hidden_layers=2,num_experts=4").join(sweep::RUN_RECORD), "{\"exit_code\": 1}").unwrap();
    assert_eq!(sweep::collect(out, &sweep)[2].status, Status::Failed);
    std::fs::write(out.join("num_hidden_layers=2,num_experts=4").join(sweep::RUN_RECORD), "{\"exit_code\": 0}").unwrap();

    let report = sweep::report(out).unwrap();
    assert_eq!(report.rows, rows);
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "run,model.num_hidden_layers,model.num_experts,status,parameters,active_parameters,tokens,train_loss,val_loss,val_accuracy,tokens_per_s,train_seconds");
    assert_eq!(lines[1], "\"num_hidden_layers=1,num_experts=4\",1,4,ok,1000000,600000,512,8.5,8.25,0.125,1234.5,12.5");
    assert_eq!(lines[2], "\"num_hidden_layers=1,num_experts=8\",1,8,failed,,,,,,,,");
    assert_eq!(lines[4], "\"num_hidden_layers=2,num_experts=8\",2,8,missing,,,,,,,,");
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert_eq!(md, report.table);
    let md: Vec<&str> = md.lines().collect();
    assert_eq!(md[0], "| num_hidden_layers | num_experts | status | params | active | tokens | train loss | val loss | val acc | tok/s | train s |");
    assert_eq!(md[2], "| 1 | 4 | ok | 1.00M | 600.0K | 512 | 8.5000 | 8.2500 | 0.125 | 1234 | 12.5 |");
    assert_eq!(md[5], "| 2 | 8 | missing | - | - | - | - | - | - | - | - |");
    assert_eq!(md.len(), 6);
    assert_eq!(png_size(&out.join("loss_vs_params.png")), (1200, 480));
    assert_eq!(png_size(&out.join("loss_vs_tokens.png")), (960, 540));
}

#[test]
fn plots_of_a_sweep_with_one_run_or_none() {
    let tmp = tempfile::tempdir().unwrap();
    let sweep = Sweep {
        group: "g".into(),
        notebook: "nb".into(),
        preset: None,
        steps: None,
        set: String::new(),
        grid: vec![axis("train.lr", &["1e-3", "3e-3"])],
    };
    sweep.save(tmp.path()).unwrap();
    sweep::report(tmp.path()).unwrap(); // nothing ran yet: empty axes, no error
    fake_run(&tmp.path().join("lr=1e-3"), 5_000, 5_000, &[(0, 4.0), (64, 4.0)], 4.0, 0.5);
    let r = sweep::report(tmp.path()).unwrap();
    assert_eq!(r.rows.iter().map(|r| r.status).collect::<Vec<_>>(), [Status::Ok, Status::Missing]);
    assert_eq!(png_size(&tmp.path().join("loss_vs_params.png")), (1200, 480));
}
