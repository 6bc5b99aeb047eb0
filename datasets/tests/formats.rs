//! Each format built byte by byte as its publisher describes it, read back; corrupted
//! variants give errors naming the file.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use datasets::cifar::{self, Cifar};
use datasets::folder::ImageFolder;
use datasets::mnist::{self, Idx};
use datasets::Split;
use datasets::{download, Source};

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("datasets-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cifar_records(head: &[u8], n: usize, seed: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        out.extend_from_slice(head);
        let last = out.len() - 1;
        out[last] = (i as u8 + seed) % 10;
        out.extend((0..3072).map(|p| ((p + i) % 256) as u8));
    }
    out
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn tar_gz(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    gz(&b.into_inner().unwrap())
}

fn cifar10_members() -> Vec<(String, Vec<u8>)> {
    let mut m: Vec<(String, Vec<u8>)> = (1..=5)
        .map(|k| {
            (
                format!("cifar-10-batches-bin/data_batch_{k}.bin"),
                cifar_records(&[0], 3, k as u8),
            )
        })
        .collect();
    m.push((
        "cifar-10-batches-bin/test_batch.bin".into(),
        cifar_records(&[0], 4, 7),
    ));
    let names = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n";
    m.push((
        "cifar-10-batches-bin/batches.meta.txt".into(),
        names.as_bytes().to_vec(),
    ));
    m
}

#[test]
fn cifar10_reads_from_the_folder_and_from_the_tar_gz_alike() {
    let d = TempDir::new("cifar10");
    let members = cifar10_members();
    for (name, data) in &members {
        let p = d.0.join("extracted").join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    std::fs::create_dir_all(d.0.join("archive")).unwrap();
    std::fs::write(d.0.join("archive/cifar-10-binary.tar.gz"), tar_gz(&members)).unwrap();
    let a = cifar::load(Cifar::Ten, &d.0.join("extracted"), Split::Train).unwrap();
    let b = cifar::load(Cifar::Ten, &d.0.join("archive"), Split::Train).unwrap();
    assert_eq!(a.len(), 15);
    assert_eq!(a.labels(), b.labels());
    assert_eq!(a.info().classes[1], "automobile");
    let (img, label) = a.get(4).unwrap();
    assert_eq!((img.channels, img.height, img.width, label), (3, 32, 32, 3));
    assert_eq!(img.data[..3], [1, 2, 3]); // record 1 of batch 2, red plane first
    assert_eq!(b.get(4).unwrap().0, img);
    assert_eq!(
        cifar::load(Cifar::Ten, &d.0.join("archive"), Split::Test)
            .unwrap()
            .len(),
        4
    );
}

#[test]
fn cifar100_fine_and_coarse_labels() {
    let d = TempDir::new("cifar100");
    let folder = d.0.join("cifar-100-binary");
    std::fs::create_dir_all(&folder).unwrap();
    let mut train = Vec::new();
    for i in 0..5u8 {
        train.extend_from_slice(&[i % 20, 50 + i]);
        train.extend(std::iter::repeat_n(i, 3072));
    }
    std::fs::write(folder.join("train.bin"), &train).unwrap();
    let fine = cifar::load(Cifar::Hundred, &d.0, Split::Train).unwrap();
    assert_eq!(fine.labels(), &[50, 51, 52, 53, 54]);
    assert_eq!(fine.info().classes.len(), 100);
    let coarse = cifar::load(Cifar::HundredCoarse, &d.0, Split::Train).unwrap();
    assert_eq!(coarse.labels(), &[0, 1, 2, 3, 4]);
}

#[test]
fn corrupt_cifar_files_name_the_file_and_record() {
    let d = TempDir::new("cifarbad");
    let folder = d.0.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&folder).unwrap();
    let mut rec = cifar_records(&[0], 3, 0);
    for k in 1..=5 {
        std::fs::write(folder.join(format!("data_batch_{k}.bin")), &rec).unwrap();
    }
    std::fs::write(folder.join("data_batch_3.bin"), &rec[..rec.len() - 10]).unwrap();
    let msg = cifar::load(Cifar::Ten, &d.0, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("data_batch_3.bin")
            && msg.contains("truncated or corrupt record at byte 6146"),
        "{msg}"
    );
    rec[3073] = 11;
    std::fs::write(folder.join("data_batch_3.bin"), &rec).unwrap();
    let msg = cifar::load(Cifar::Ten, &d.0, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("data_batch_3.bin") && msg.contains("record 1 (byte 3073): label 11"),
        "{msg}"
    );
    let msg = cifar::load(Cifar::Ten, &d.0.join("nothing"), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("--download"), "{msg}");
    std::fs::write(
        d.0.join("cifar-10-binary.tar.gz"),
        b"\x1f\x8bnot really gzip",
    )
    .unwrap();
    std::fs::remove_dir_all(&folder).unwrap();
    let msg = cifar::load(Cifar::Ten, &d.0, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("cifar-10-binary.tar.gz") && msg.contains("corrupt"),
        "{msg}"
    );
}

fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

#[test]
fn mnist_idx_plain_and_gz() {
    let d = TempDir::new("mnist");
    let images: Vec<u8> = (0..3 * 28 * 28).map(|i| (i % 256) as u8).collect();
    std::fs::write(
        d.0.join("train-images-idx3-ubyte"),
        idx(0x803, &[3, 28, 28], &images),
    )
    .unwrap();
    std::fs::write(
        d.0.join("train-labels-idx1-ubyte.gz"),
        gz(&idx(0x801, &[3], &[7, 0, 9])),
    )
    .unwrap();
    let m = mnist::load(Idx::Mnist, &d.0, Split::Train).unwrap();
    assert_eq!(m.labels(), &[7, 0, 9]);
    let (img, _) = m.get(1).unwrap();
    assert_eq!(
        (img.channels, img.height, img.width, img.data[0]),
        (1, 28, 28, (784 % 256) as u8)
    );
    let f = mnist::load(Idx::FashionMnist, &d.0, Split::Train).unwrap();
    assert_eq!(f.info().classes[9], "Ankle boot");

    let cases: Vec<(Vec<u8>, Vec<u8>, &str)> = vec![
        (
            idx(0x803, &[3, 28, 28], &images),
            idx(0x803, &[3], &[1, 2, 3]),
            "wrong magic number 0x00000803 at byte 0, expected 0x00000801",
        ),
        (
            idx(0x803, &[3, 28, 28], &images[..100]),
            idx(0x801, &[3], &[1, 2, 3]),
            "need 2352 data bytes after byte 16, found 100",
        ),
        (
            idx(0x803, &[3, 28, 28], &images),
            idx(0x801, &[2], &[1, 2]),
            "2 labels for 3 images",
        ),
        (
            idx(0x803, &[3, 28, 28], &images),
            idx(0x801, &[3], &[1, 12, 3]),
            "record 1 (byte 9): label 12",
        ),
        (
            // dims whose product does not fit in 64 bits
            idx(0x803, &[u32::MAX, u32::MAX, u32::MAX], &images),
            idx(0x801, &[3], &[1, 2, 3]),
            "need more than 2^64 data bytes after byte 16, found 2352",
        ),
    ];
    for (i, l, want) in cases {
        std::fs::write(d.0.join("t10k-images-idx3-ubyte"), i).unwrap();
        std::fs::write(d.0.join("t10k-labels-idx1-ubyte"), l).unwrap();
        let msg = mnist::load(Idx::Mnist, &d.0, Split::Test)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("t10k-") && msg.contains(want), "{msg}");
    }
    std::fs::write(d.0.join("t10k-labels-idx1-ubyte"), b"").unwrap();
    std::fs::remove_file(d.0.join("t10k-labels-idx1-ubyte")).unwrap();
    std::fs::write(
        d.0.join("t10k-labels-idx1-ubyte.gz"),
        b"\x1f\x8b\x08garbage",
    )
    .unwrap();
    let msg = mnist::load(Idx::Mnist, &d.0, Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("t10k-labels-idx1-ubyte.gz") && msg.contains("corrupt gzip"),
        "{msg}"
    );
}

#[test]
fn gzip_output_is_capped() {
    // 4 MB of zeros compress to a few kilobytes: the cap, not the input size, bounds memory
    let bomb = gz(&vec![0u8; 4 << 20]);
    assert!(bomb.len() < 64 << 10);
    let path = Path::new("bomb.gz");
    let msg = datasets::archive::gunzip_at_most(&bomb, path, 1 << 20)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("bomb.gz") && msg.contains("decompresses to more than 1048576 bytes"),
        "{msg}"
    );
    assert_eq!(
        datasets::archive::gunzip_at_most(&bomb, path, 4 << 20)
            .unwrap()
            .len(),
        4 << 20
    );
}

fn write_image(path: &Path, w: u32, h: u32, shade: u8) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([shade, (x * 10) as u8, (y * 10) as u8])
    });
    img.save(path).unwrap();
}

#[test]
fn image_folders_decode_jpeg_and_png_with_sorted_classes() {
    let d = TempDir::new("folder");
    for (class, shade) in [("zebra", 200u8), ("ant", 10)] {
        std::fs::create_dir_all(d.0.join(class)).unwrap();
        write_image(&d.0.join(class).join("a.png"), 6, 4, shade);
        write_image(&d.0.join(class).join("b.jpg"), 5, 5, shade);
    }
    std::fs::write(d.0.join("ant/notes.txt"), b"ignored").unwrap();
    let f = ImageFolder::open(&d.0, None, false).unwrap();
    assert_eq!(f.info().classes, vec!["ant", "zebra"]);
    assert_eq!(f.len(), 4);
    let (img, label) = f.get(0).unwrap();
    assert_eq!((img.channels, img.height, img.width, label), (3, 4, 6, 0));
    assert_eq!(img.data[0], 10); // red plane of an "ant" image
    let (img, label) = f.get(3).unwrap();
    assert_eq!((img.height, img.width, label), (5, 5, 1));
    assert!(img.data[0].abs_diff(200) < 8, "jpeg is lossy but close");

    std::fs::write(d.0.join("zebra/broken.png"), b"\x89PNG\r\n\x1a\nbroken").unwrap();
    let msg = ImageFolder::open(&d.0, None, false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("broken.png") && msg.contains("unreadable image"),
        "{msg}"
    );
    let f = ImageFolder::open(&d.0, None, true).unwrap();
    assert_eq!((f.len(), f.skipped), (4, 1));
    std::fs::create_dir_all(d.0.join("empty")).unwrap();
    let msg = ImageFolder::open(&d.0, None, true).unwrap_err().to_string();
    assert!(
        msg.contains("empty") && msg.contains("empty class folder"),
        "{msg}"
    );
}

/// Serves `routes` (path → body, optional advertised length) on 127.0.0.1 for `requests` requests.
fn serve(
    routes: Vec<(String, Vec<u8>, Option<usize>)>,
    requests: usize,
) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let mut s = stream.unwrap();
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
            match routes.iter().find(|(p, _, _)| *p == path) {
                Some((_, body, len)) => {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        len.unwrap_or(body.len())
                    );
                    let _ = s.write_all(head.as_bytes());
                    let _ = s.write_all(body);
                }
                None => {
                    let _ = s.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
            }
        }
    });
    (format!("http://{addr}/"), handle)
}

#[test]
fn download_checks_md5_and_never_leaves_half_files() {
    let d = TempDir::new("download");
    let archive = tar_gz(&cifar10_members());
    let md5 = {
        use md5::Digest;
        md5::Md5::digest(&archive)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let md5: &'static str = Box::leak(md5.into_boxed_str());
    let remote = [download::Remote {
        file: "cifar-10-binary.tar.gz",
        md5,
        max_bytes: archive.len() as u64 + 100,
    }];
    let routes = vec![
        (
            "/good/cifar-10-binary.tar.gz".to_string(),
            archive.clone(),
            None,
        ),
        (
            "/cut/cifar-10-binary.tar.gz".to_string(),
            archive[..archive.len() / 2].to_vec(),
            Some(archive.len()),
        ),
        (
            "/long/cifar-10-binary.tar.gz".to_string(),
            vec![0u8; archive.len() + 101],
            None,
        ),
        (
            "/wrong/cifar-10-binary.tar.gz".to_string(),
            b"something else entirely".to_vec(),
            None,
        ),
    ];
    let (base, server) = serve(routes, 6);
    let no_files = |dir: &Path| std::fs::read_dir(dir).map(|r| r.count()).unwrap_or(0) == 0;

    let msg = download::fetch_all(&format!("{base}cut/"), &remote, &d.0.join("a"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("broke off") || msg.contains("checksum"),
        "{msg}"
    );
    assert!(
        no_files(&d.0.join("a")),
        "an interrupted download leaves nothing behind"
    );
    let msg = download::fetch_all(&format!("{base}long/"), &remote, &d.0.join("a"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("longer than"), "{msg}");
    assert!(
        no_files(&d.0.join("a")),
        "an over-long download leaves nothing behind"
    );
    let msg = download::fetch_all(&format!("{base}wrong/"), &remote, &d.0.join("a"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("checksum mismatch") && msg.contains(md5),
        "{msg}"
    );
    assert!(no_files(&d.0.join("a")));
    let msg = download::fetch_all(&format!("{base}missing/"), &remote, &d.0.join("a"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("404"), "{msg}");

    assert_eq!(
        download::fetch_all(&format!("{base}good/"), &remote, &d.0.join("a")).unwrap(),
        1
    );
    assert_eq!(
        cifar::load(Cifar::Ten, &d.0.join("a"), Split::Test)
            .unwrap()
            .len(),
        4
    );
    // present and valid: nothing fetched (the server would refuse a sixth request anyway)
    assert_eq!(
        download::fetch_all(&format!("{base}good/"), &remote, &d.0.join("a")).unwrap(),
        0
    );
    assert_eq!(
        download::fetch_all(&format!("{base}good/"), &remote, &d.0.join("a")).unwrap(),
        0
    );
    drop(server);
}
