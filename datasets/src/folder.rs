//! An image folder in the ImageNet layout: one subfolder per class (class index = sorted
//! subfolder order), JPEG and PNG files, decoded lazily on the loader's threads so memory
//! stays bounded for ImageNet-sized folders.

use std::path::{Path, PathBuf};

use crate::transforms::constants::{IMAGENET_MEAN, IMAGENET_STD};
use crate::{DataError, Image, Info, Source};

/// A lazily decoded image folder.
#[derive(Debug)]
pub struct ImageFolder {
    info: Info,
    files: Vec<(PathBuf, u16)>,
    /// Files skipped because their header could not be read (with `skip_unreadable`).
    pub skipped: usize,
    /// Whether unreadable files are skipped (at opening and when decoded in a batch).
    skip_unreadable: bool,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .map(|e| e.to_ascii_lowercase())
        .is_some_and(|e| e == "jpg" || e == "jpeg" || e == "png")
}

impl ImageFolder {
    /// Indexes `root/<class>/*.{jpg,jpeg,png}`. Class names come from `classes` when given
    /// (so a validation folder uses the training folder's order), else from the sorted
    /// subfolders. Each file's header is read to check it; an unreadable one is an error,
    /// or, with `skip_unreadable`, skipped and counted in [`ImageFolder::skipped`].
    pub fn open(
        root: &Path,
        classes: Option<&[String]>,
        skip_unreadable: bool,
    ) -> Result<Self, DataError> {
        let read = |p: &Path, e| DataError::Read {
            path: p.into(),
            error: e,
        };
        let mut dirs: Vec<String> = std::fs::read_dir(root)
            .map_err(|e| read(root, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        dirs.sort();
        if dirs.is_empty() {
            return Err(DataError::Format {
                path: root.into(),
                msg: "no class subfolders".into(),
            });
        }
        let classes: Vec<String> = classes.map(<[String]>::to_vec).unwrap_or(dirs.clone());
        let mut files = Vec::new();
        let mut skipped = 0;
        for d in &dirs {
            let Some(label) = classes.iter().position(|c| c == d) else {
                return Err(DataError::Format {
                    path: root.join(d),
                    msg: format!("class `{d}` is not among the training classes"),
                });
            };
            let mut found: Vec<PathBuf> = std::fs::read_dir(root.join(d))
                .map_err(|e| read(&root.join(d), e))?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| is_image(p))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(DataError::Format {
                    path: root.join(d),
                    msg: "empty class folder (no .jpg, .jpeg or .png files)".into(),
                });
            }
            for f in found {
                match image::ImageReader::open(&f)
                    .and_then(|r| r.with_guessed_format())
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.into_dimensions().map_err(|e| e.to_string()))
                    .and_then(|(w, h)| {
                        if w.max(h) > MAX_SIDE {
                            Err(format!("{w}x{h} pixels, more than {MAX_SIDE} on a side"))
                        } else {
                            Ok(())
                        }
                    }) {
                    Ok(()) => files.push((f, label as u16)),
                    Err(_) if skip_unreadable => skipped += 1,
                    Err(e) => {
                        return Err(DataError::Format {
                            path: f,
                            msg: format!("unreadable image: {e}"),
                        })
                    }
                }
            }
        }
        if files.is_empty() {
            return Err(DataError::Format {
                path: root.into(),
                msg: format!("no readable image ({skipped} unreadable)"),
            });
        }
        if skipped > 0 {
            eprintln!(
                "warning: skipped {skipped} unreadable image(s) under `{}`",
                root.display()
            );
        }
        let info = Info {
            name: "folder".into(),
            channels: 3,
            height: 0,
            width: 0,
            classes,
            max_value: 255.0,
            mean: IMAGENET_MEAN.to_vec(),
            std: IMAGENET_STD.to_vec(),
        };
        Ok(Self {
            info,
            files,
            skipped,
            skip_unreadable,
        })
    }
}

/// The longest side of an image the folder reader decodes.
pub const MAX_SIDE: u32 = 16_384;
/// The most memory the decoder may take for one image.
pub const MAX_DECODE_BYTES: u64 = 1 << 30;

/// Decodes one image file to 8-bit RGB, channels first; images larger than [`MAX_SIDE`]
/// on a side, or needing more than [`MAX_DECODE_BYTES`] to decode, are errors.
pub fn decode_rgb(path: &Path) -> Result<Image, DataError> {
    let bytes = resnext_fs::read_at_most(path, MAX_DECODE_BYTES)?;
    decode_rgb_bytes(&bytes, path)
}

/// [`decode_rgb`] on the bytes of an image file; `path` labels errors.
pub fn decode_rgb_bytes(bytes: &[u8], path: &Path) -> Result<Image, DataError> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DataError::Read {
            path: path.into(),
            error: e,
        })?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| DataError::Format {
            path: path.into(),
            msg: format!("unreadable image: {e}"),
        })?
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.into_raw();
    let mut data = vec![0u8; 3 * h * w];
    for (i, px) in raw.chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * h * w + i] = px[c];
        }
    }
    Ok(Image {
        channels: 3,
        height: h,
        width: w,
        data,
    })
}

impl Source for ImageFolder {
    fn info(&self) -> &Info {
        &self.info
    }
    fn len(&self) -> usize {
        self.files.len()
    }
    fn get(&self, index: usize) -> Result<(Image, usize), DataError> {
        let (path, label) = self.files.get(index).ok_or(DataError::OutOfRange {
            index,
            len: self.files.len(),
        })?;
        Ok((decode_rgb(path)?, *label as usize))
    }
    fn label(&self, index: usize) -> Result<usize, DataError> {
        self.files
            .get(index)
            .map(|f| f.1 as usize)
            .ok_or(DataError::OutOfRange {
                index,
                len: self.files.len(),
            })
    }
    fn skips_unreadable(&self) -> bool {
        self.skip_unreadable
    }
}
