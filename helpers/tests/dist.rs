//! helpers::dist with 2 ranks over Gloo on 127.0.0.1: each test below starts this test binary
//! twice as ranks 0 and 1 (as torchrun would: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), running
//! one of the `rank_*` bodies, and checks what both processes report.
use helpers::dist::Dist;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs the ignored test `body` of this binary as 2 ranks; both are killed after `deadline`.
fn run_ranks(body: &str, env: &[(&str, &str)], deadline: Duration) -> Vec<Output> {
    let port = free_port().to_string();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            let mut c = Command::new(std::env::current_exe().unwrap());
            c.args([body, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("MOE_DIST_RANK_BODY", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            for (k, v) in env {
                c.env(k, v);
            }
            c.spawn().unwrap()
        })
        .collect();
    let t0 = Instant::now();
    let mut children = children;
    while children.iter_mut().any(|c| c.try_wait().unwrap().is_none()) {
        if t0.elapsed() > deadline {
            for c in &mut children {
                let _ = c.kill();
            }
            panic!("the ranks of {body} hung: killed after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let outs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for (r, o) in outs.iter().enumerate() {
        println!("--- rank {r} ({:?}):\n{}{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    }
    outs
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn is_rank() -> bool {
    std::env::var("MOE_DIST_RANK_BODY").is_ok()
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

#[test]
fn collectives_agree_over_two_ranks() {
    let outs = run_ranks("rank_collectives", &[], Duration::from_secs(120));
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r} failed:\n{}", text(o));
        assert!(text(o).contains(&format!("rank {r}: every collective checked")), "rank {r}:\n{}", text(o));
    }
}

#[test]
#[ignore = "one rank of collectives_agree_over_two_ranks, started by it"]
fn rank_collectives() {
    assert!(is_rank());
    let d = Dist::from_env().unwrap();
    assert_eq!((d.world, d.local_world), (2, 2));
    let r = d.rank as f64;
    // all-reduce: sum and mean, several tensors at once.
    let a = Tensor::from_slice(&[r + 1.0, 10.0 * (r + 1.0)]);
    let b = Tensor::from_slice(&[r]).to_kind(Kind::Float);
    d.all_reduce_sum(&[a.shallow_clone(), b.shallow_clone()]).unwrap();
    assert_eq!((values(&a), values(&b)), (vec![3.0, 30.0], vec![1.0]));
    let m = Tensor::from_slice(&[2.0 * r, 4.0]);
    d.all_reduce_mean(&[m.shallow_clone()]).unwrap();
    assert_eq!(values(&m), vec![1.0, 4.0]);
    // broadcast: every rank ends with rank 0's values.
    let w = Tensor::from_slice(&[r, r, r]).to_kind(Kind::Float);
    d.broadcast_from_main(&[w.shallow_clone()]).unwrap();
    assert_eq!(values(&w), vec![0.0; 3]);
    d.barrier().unwrap();
    // all-to-all: rank 0 sends 1 row to itself and 2 to rank 1; rank 1 sends 3 to rank 0, 1 to itself.
    let (in_splits, out_splits): (Vec<i64>, Vec<i64>) = if d.rank == 0 { (vec![1, 2], vec![1, 3]) } else { (vec![3, 1], vec![2, 1]) };
    let n: i64 = in_splits.iter().sum();
    let x = (Tensor::arange(n * 2, (Kind::Float, tch::Device::Cpu)).reshape([n, 2]) + 100.0 * r).set_requires_grad(true);
    let y = d.group().unwrap().all_to_all(&x, &out_splits, &in_splits).unwrap();
    let expect: Vec<f64> = if d.rank == 0 { vec![0., 1., 100., 101., 102., 103., 104., 105.] } else { vec![2., 3., 4., 5., 106., 107.] };
    assert_eq!(values(&y), expect, "rows received by rank {}", d.rank);
    // Its backward: d(sum(y * c))/dx sends c back to the rows' senders, where c marks the receiver.
    let c = Tensor::full([y.size()[0], 2], 1.0 + r, (Kind::Float, tch::Device::Cpu));
    (&y * &c).sum(Kind::Float).backward();
    let gx = values(&x.grad());
    let expect: Vec<f64> = if d.rank == 0 { vec![1., 1., 2., 2., 2., 2.] } else { vec![1., 1., 1., 1., 1., 1., 2., 2.] };
    assert_eq!(gx, expect, "gradient on rank {}", d.rank);
    // Bad splits are an error on every rank, not a crash.
    let e = d.group().unwrap().all_to_all(&x, &out_splits, &[n + 1, 0]).unwrap_err().to_string();
    assert!(e.contains(&format!("rank {} of 2: all_to_all failed", d.rank)) && e.contains("add up to"), "{e}");
    // Gradient averaging: a parameter's gradient becomes the mean over ranks; one without a
    // gradient on this rank counts as zero.
    let p = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let q = Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    (&p * (2.0 * r + 1.0)).sum(Kind::Float).backward();
    if d.rank == 1 {
        (&q * 4.0).sum(Kind::Float).backward();
    }
    d.average_gradients(&[("p".into(), p.shallow_clone()), ("q".into(), q.shallow_clone())]).unwrap();
    assert_eq!((values(&p.grad()), values(&q.grad())), (vec![2.0; 3], vec![2.0; 4]));
    // Sub-groups: only members get one; a group of both ranks reduces like the whole run.
    let solo = d.subgroup(&[1]).unwrap();
    assert_eq!(solo.as_ref().map(|g| (g.rank, g.size)), if d.rank == 1 { Some((0, 1)) } else { None });
    let both = d.subgroup(&[0, 1]).unwrap().unwrap();
    let s = Tensor::from_slice(&[r + 5.0]);
    both.all_reduce_sum(&[s.shallow_clone()]).unwrap();
    assert_eq!(values(&s), vec![11.0]);
    assert!(d.comm_seconds() > 0.0);
    println!("rank {}: every collective checked", d.rank);
}

#[test]
fn a_rank_that_dies_ends_the_other_with_a_clear_error() {
    let outs = run_ranks("rank_dies", &[("MOE_DIST_TIMEOUT", "20")], Duration::from_secs(120));
    assert_eq!(outs[1].status.code(), Some(3), "rank 1 exits on purpose:\n{}", text(&outs[1]));
    assert!(outs[0].status.success(), "{}", text(&outs[0]));
    let t = text(&outs[0]);
    assert!(t.contains("rank 0 of 2: all_reduce failed") && t.contains("Another rank probably stopped"), "{t}");
}

#[test]
#[ignore = "one rank of a_rank_that_dies_ends_the_other_with_a_clear_error, started by it"]
fn rank_dies() {
    assert!(is_rank());
    let d = Dist::from_env().unwrap();
    d.barrier().unwrap();
    if d.rank == 1 {
        std::process::exit(3);
    }
    let t0 = Instant::now();
    let mut last = Ok(());
    for _ in 0..100 {
        last = d.all_reduce_sum(&[Tensor::ones([1000], (Kind::Float, tch::Device::Cpu))]);
        if last.is_err() {
            break;
        }
    }
    println!("error after {:.1}s: {:#}", t0.elapsed().as_secs_f64(), last.unwrap_err());
}

#[test]
fn a_rank_that_stalls_ends_the_other_at_the_timeout() {
    let outs = run_ranks("rank_stalls", &[("MOE_DIST_TIMEOUT", "3")], Duration::from_secs(120));
    assert!(outs[0].status.success(), "{}", text(&outs[0]));
    let t = text(&outs[0]);
    assert!(t.contains("rank 0 of 2: all_reduce failed") && t.contains("MOE_DIST_TIMEOUT=3s"), "{t}");
}

#[test]
#[ignore = "one rank of a_rank_that_stalls_ends_the_other_at_the_timeout, started by it"]
fn rank_stalls() {
    assert!(is_rank());
    let d = Dist::from_env().unwrap();
    d.barrier().unwrap();
    if d.rank == 1 {
        std::thread::sleep(Duration::from_secs(10)); // never reaches the all-reduce in time
        return;
    }
    let e = d.all_reduce_sum(&[Tensor::ones([4], (Kind::Float, tch::Device::Cpu))]).unwrap_err();
    println!("error: {e:#}");
}

#[test]
fn one_process_needs_no_group() {
    // Without WORLD_SIZE (this test process) every call returns at once.
    if std::env::var("WORLD_SIZE").is_ok() {
        return;
    }
    let d = Dist::from_env().unwrap();
    assert_eq!((d.rank, d.world, d.is_main()), (0, 1, true));
    let t = Tensor::from_slice(&[1.0, 2.0]);
    d.all_reduce_mean(&[t.shallow_clone()]).unwrap();
    d.broadcast_from_main(&[t.shallow_clone()]).unwrap();
    assert_eq!(values(&t), vec![1.0, 2.0]);
    assert!(d.subgroup(&[0]).unwrap().is_none());
}

#[test]
fn expert_parallel_sends_rows_to_their_experts_and_back() {
    let outs = run_ranks("rank_expert_parallel", &[], Duration::from_secs(120));
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r} failed:\n{}", text(o));
        assert!(text(o).contains(&format!("rank {r}: expert parallel checked")), "rank {r}:\n{}", text(o));
    }
}

#[test]
#[ignore = "one rank of expert_parallel_sends_rows_to_their_experts_and_back, started by it"]
fn rank_expert_parallel() {
    use helpers::dist::ExpertParallel;
    assert!(is_rank());
    let d = Dist::from_env().unwrap();
    assert!(ExpertParallel::new(&d, 3, 6).is_err(), "3 does not divide 2 ranks");
    assert!(ExpertParallel::new(&d, 2, 5).is_err(), "2 does not divide 5 experts");
    let ep = ExpertParallel::new(&d, 2, 4).unwrap().unwrap();
    assert_eq!(ep.ids, if d.rank == 0 { vec![0, 1] } else { vec![2, 3] });
    println!("{ep}");
    // Rows sorted by expert (E = 4): rank 0 sends 1, 0, 2, 1 rows to experts 0..3, rank 1 sends 0, 3, 0, 1.
    let counts: Vec<i64> = if d.rank == 0 { vec![1, 0, 2, 1] } else { vec![0, 3, 0, 1] };
    let expert: Vec<f64> = counts.iter().enumerate().flat_map(|(e, &c)| std::iter::repeat(e as f64).take(c as usize)).collect();
    let m = expert.len() as i64;
    // Each row: (100 * rank + its index, the expert it is for).
    let rows = Tensor::stack(&[Tensor::arange(m, (Kind::Double, tch::Device::Cpu)) + 100.0 * d.rank as f64, Tensor::from_slice(&expert)], 1).set_requires_grad(true);
    let mut seen = (Vec::new(), Vec::new());
    let out = ep
        .exchange(&rows, &Tensor::from_slice(&counts).to_kind(Kind::Float), |got, sizes| {
            seen = (values(got), sizes.to_vec());
            // "Expert" e multiplies the row by e + 1 (column 1 holds e).
            got * (got.narrow(1, 1, 1).detach() + 1.0)
        })
        .unwrap();
    let (got, sizes) = seen;
    // Rank 0 holds experts 0 and 1: expert 0 gets rank 0's row 0; expert 1 gets rank 1's rows 0-2.
    // Rank 1 holds 2 and 3: expert 2 gets rank 0's rows 1-2; expert 3 rank 0's row 3, then rank 1's row 3.
    let (want_rows, want_sizes): (Vec<f64>, Vec<i64>) = if d.rank == 0 {
        (vec![0.0, 0.0, 100.0, 1.0, 101.0, 1.0, 102.0, 1.0], vec![1, 3])
    } else {
        (vec![1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 103.0, 3.0], vec![2, 2])
    };
    assert_eq!((got, sizes), (want_rows, want_sizes));
    // Back in this rank's order, each row times (its expert + 1).
    let want = &rows.detach() * (Tensor::from_slice(&expert).unsqueeze(1) + 1.0);
    assert_eq!(values(&out), values(&want));
    // Backward: d(sum out)/d rows = expert + 1 in column 0 (column 1 too: it is multiplied as well).
    out.sum(Kind::Double).backward();
    let g = rows.grad();
    assert_eq!(values(&g.narrow(1, 0, 1)), expert.iter().map(|e| e + 1.0).collect::<Vec<_>>());
    // The whole stack from the shards, and a norm over them.
    let shard = Tensor::from_slice(&ep.ids).to_kind(Kind::Float).unsqueeze(1) * 10.0; // rows 10 * id
    assert_eq!(values(&ep.gather_rows(&shard).unwrap()), vec![0.0, 10.0, 20.0, 30.0]);
    let named = vec![(format!("m.experts[{}].w", ep.ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")), shard.shallow_clone()), ("other".to_string(), Tensor::from(1.0f32))];
    let whole = ep.gather_shards(named).unwrap();
    let names: Vec<&str> = whole.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["other", "m.experts.w"]);
    let norm = ep.norm_over_shards(&Tensor::from(if d.rank == 0 { 3.0f32 } else { 4.0 })).unwrap();
    assert!((norm.double_value(&[]) - 5.0).abs() < 1e-6);
    println!("rank {}: expert parallel checked", d.rank);
}
