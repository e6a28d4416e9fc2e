//! Shared by the integration tests: a fake Hugging Face hub on 127.0.0.1 and a parquet writer.
#![allow(dead_code)]
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// One request the fake hub saw.
#[derive(Clone, Debug)]
pub struct Request {
    pub path: String,
    pub auth: Option<String>,
    pub range: Option<String>,
}

pub struct FakeHub {
    pub url: String,
    pub requests: Arc<Mutex<Vec<Request>>>,
    /// When non-zero, the next body transfer stops after this many bytes and the connection is
    /// closed (an interrupted download); then it is reset to 0.
    pub cut_after: Arc<AtomicUsize>,
}

/// Serves `repos`: key `owner/name` (a model) or `datasets/owner/name`, value the files by path.
/// It speaks what hf-hub uses: `GET /{repo}/resolve/{rev}/{file}` with `Range: bytes=0-0` for
/// metadata (`ETag`, `X-Repo-Commit`, `Content-Range`) then a ranged GET for the bytes (resumed
/// from an offset after an interruption); `GET /api/{models|datasets}/{repo}/revision/{rev}` for
/// the file list; 404 for anything else.
pub fn serve(repos: HashMap<String, HashMap<String, Vec<u8>>>) -> FakeHub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let cut_after = Arc::new(AtomicUsize::new(0));
    let (log, cut) = (requests.clone(), cut_after.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().take(500) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let (mut range, mut auth) = (None, None);
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap_or((&h, ""));
                match k.to_ascii_lowercase().as_str() {
                    "range" => range = Some(v.trim().to_string()),
                    "authorization" => auth = Some(v.trim().to_string()),
                    _ => {}
                }
            }
            log.lock().unwrap().push(Request { path: path.clone(), auth, range: range.clone() });
            let p = path.trim_start_matches('/').split('?').next().unwrap_or("").to_string();
            let not_found = |s: &mut std::net::TcpStream| {
                let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            };
            if let Some(api) = p.strip_prefix("api/") {
                // api/models/{o}/{n}/revision/{rev} or api/datasets/{o}/{n}/revision/{rev}
                let parts: Vec<&str> = api.split('/').collect();
                let key = match parts.first() {
                    Some(&"datasets") if parts.len() >= 3 => {
                        format!("datasets/{}/{}", parts[1], parts[2])
                    }
                    Some(&"models") if parts.len() >= 3 => format!("{}/{}", parts[1], parts[2]),
                    _ => String::new(),
                };
                let Some(files) = repos.get(&key) else {
                    not_found(&mut stream);
                    continue;
                };
                let mut names: Vec<&String> = files.keys().collect();
                names.sort();
                let siblings: Vec<String> = names.iter().map(|n| format!("{{\"rfilename\":\"{n}\"}}")).collect();
                let body = format!("{{\"sha\":\"{COMMIT}\",\"siblings\":[{}]}}", siblings.join(","));
                let head =
                    format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body.as_bytes()));
                continue;
            }
            let found = repos.iter().find_map(|(key, files)| {
                let rest = p.strip_prefix(key.as_str())?.strip_prefix("/resolve/")?;
                let (_rev, file) = rest.split_once('/')?;
                files.get(file).map(|b| (file.to_string(), b))
            });
            let Some((file, body)) = found else {
                not_found(&mut stream);
                continue;
            };
            let start: usize =
                range.as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split('-').next()).and_then(|s| s.parse().ok()).unwrap_or(0);
            let meta = range.as_deref() == Some("bytes=0-0");
            let end = if meta { 1.min(body.len()) } else { body.len() };
            let chunk = &body[start.min(end)..end];
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\nETag: \"{:016x}{}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
                chunk.len(), start, end.saturating_sub(1), body.len(), body.len(), file.len()
            );
            let n = if meta { 0 } else { cut.swap(0, Ordering::SeqCst) };
            let send = if n > 0 { &chunk[..n.min(chunk.len())] } else { chunk };
            let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(send));
        }
    });
    FakeHub { url, requests, cut_after }
}

/// A parquet file shaped like FineWeb-Edu's (`text`, `language`, `score`, plus an `id`), written
/// with `rows_per_group` rows per row group.
pub fn write_parquet(path: &Path, rows: &[(&str, &str, f64)], rows_per_group: usize) {
    use parquet::data_type::{ByteArray, ByteArrayType, DoubleType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message doc { REQUIRED BYTE_ARRAY id (UTF8); REQUIRED BYTE_ARRAY text (UTF8); OPTIONAL BYTE_ARRAY language (UTF8); OPTIONAL DOUBLE score; }",
        )
        .unwrap(),
    );
    let props = Arc::new(WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build());
    let mut w = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    for (g, group) in rows.chunks(rows_per_group).enumerate() {
        let mut rg = w.next_row_group().unwrap();
        let strings = |f: &dyn Fn(usize) -> String| -> Vec<ByteArray> { (0..group.len()).map(|i| ByteArray::from(f(i).as_str())).collect() };
        let cols: [Vec<ByteArray>; 3] =
            [strings(&|i| format!("doc-{g}-{i}")), strings(&|i| group[i].0.to_string()), strings(&|i| group[i].1.to_string())];
        for (k, vals) in cols.iter().enumerate() {
            let mut c = rg.next_column().unwrap().unwrap();
            let defs = vec![1i16; vals.len()];
            c.typed::<ByteArrayType>().write_batch(vals, if k == 2 { Some(&defs) } else { None }, None).unwrap();
            c.close().unwrap();
        }
        let mut c = rg.next_column().unwrap().unwrap();
        let scores: Vec<f64> = group.iter().map(|r| r.2).collect();
        c.typed::<DoubleType>().write_batch(&scores, Some(&vec![1i16; scores.len()]), None).unwrap();
        c.close().unwrap();
        rg.close().unwrap();
    }
    w.close().unwrap();
}
