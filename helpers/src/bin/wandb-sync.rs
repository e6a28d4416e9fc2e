//! `bash setup.sh wandb-sync <run dir>`: uploads a run's W&B spool (an offline run, or one whose
//! uploads failed) with the same client the notebook uses. Settings as in the notebook:
//! `secrets.env`, then the environment, then `~/.netrc`.
use std::path::PathBuf;

fn main() {
    let Some(dir) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: bash setup.sh wandb-sync <run dir>   (a directory with wandb/spool.jsonl)");
        std::process::exit(2);
    };
    let result = (|| -> anyhow::Result<helpers::wandb::FinishReport> {
        let root = helpers::project_root().unwrap_or_else(|_| std::env::current_dir().unwrap_or_default());
        let settings = helpers::wandb::Settings::from_env(&root, "moe-research")?;
        helpers::wandb::sync(&dir, &settings)
    })();
    match result {
        Ok(r) => println!("wandb-sync: {} rows in the spool, {} on the server, run {}", r.rows, r.rows_sent, if r.complete { "complete" } else { "not marked complete (it never finished)" }),
        Err(e) => {
            eprintln!("wandb-sync: {e:#}");
            std::process::exit(1);
        }
    }
}
