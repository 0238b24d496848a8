//! Pictures from the media threads onto the screen.
//!
//! A [`PictureSlot`] holds the newest picture as the decoder or the camera made it
//! (I420). In the desktop window (OpenGL through glow) its three planes are uploaded as
//! textures and a shader turns them into RGB while drawing ([`yuv_gl`](super::yuv_gl)):
//! the CPU never converts a pixel for the screen. Without OpenGL (tests with no GPU, or
//! a driver that cannot compile the shader) the picture is converted to RGBA here and
//! drawn as an ordinary egui texture. Either way: one upload per new picture, nothing
//! when none arrived.

use std::sync::{Arc, Mutex, PoisonError};

use eframe::egui;

use super::yuv_gl::GlPicture;
use crate::media::picture::{Picture, PictureSlot};

/// One video stream on screen.
pub struct VideoTexture {
    name: &'static str,
    draw: Draw,
    /// The picture's size in pixels, once one arrived.
    size: Option<[usize; 2]>,
    /// Pictures uploaded so far.
    pub uploads: u64,
}

/// How the pictures are drawn.
enum Draw {
    /// Converted to RGBA on the CPU, an egui texture.
    Cpu(Option<egui::TextureHandle>),
    /// Planes uploaded to OpenGL textures, converted by a shader (shared with the paint
    /// callbacks, which run when egui renders).
    Gpu(Arc<Mutex<GlPicture>>),
}

impl VideoTexture {
    /// A stream drawn with OpenGL when `gpu` (the window runs on glow), else on the CPU.
    pub fn new(name: &'static str, gpu: bool) -> VideoTexture {
        VideoTexture {
            name,
            draw: if gpu {
                Draw::Gpu(Arc::default())
            } else {
                Draw::Cpu(None)
            },
            size: None,
            uploads: 0,
        }
    }

    /// Takes the slot's picture if a new one is waiting.
    pub fn update(&mut self, ctx: &egui::Context, slot: &PictureSlot) {
        if let Draw::Gpu(gl) = &self.draw
            && lock(gl).failed()
        {
            tracing::warn!(
                name = self.name,
                "OpenGL cannot draw video here; converting on the CPU"
            );
            self.draw = Draw::Cpu(None);
        }
        let Some(picture) = slot.take() else {
            return;
        };
        self.size = Some([picture.width, picture.height]);
        match &mut self.draw {
            Draw::Gpu(gl) => lock(gl).show(picture),
            Draw::Cpu(texture) => {
                let image = color_image(&picture);
                match texture {
                    Some(t) => t.set(image, egui::TextureOptions::LINEAR),
                    None => {
                        *texture =
                            Some(ctx.load_texture(self.name, image, egui::TextureOptions::LINEAR));
                    }
                }
            }
        }
        self.uploads += 1;
    }

    /// Forgets the picture (e.g. camera off), so nothing stale is shown.
    pub fn clear(&mut self) {
        self.size = None;
        match &mut self.draw {
            Draw::Cpu(texture) => *texture = None,
            Draw::Gpu(gl) => lock(gl).clear(),
        }
    }

    /// The picture scaled to fit `area`, aspect kept, centred: the rect it covers.
    pub fn fit(&self, area: egui::Rect) -> Option<egui::Rect> {
        let [w, h] = self.size?;
        let size = egui::vec2(w as f32, h as f32);
        let scale = (area.width() / size.x).min(area.height() / size.y);
        Some(egui::Rect::from_center_size(area.center(), size * scale))
    }

    /// Paints the picture into `rect` (stretched: call [`VideoTexture::fit`] first).
    pub fn paint(&self, ui: &egui::Ui, rect: egui::Rect) {
        match &self.draw {
            Draw::Cpu(Some(t)) => {
                let uv = egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0));
                ui.painter().image(t.id(), rect, uv, egui::Color32::WHITE);
            }
            Draw::Cpu(None) => {}
            Draw::Gpu(gl) => {
                let gl = gl.clone();
                let callback = eframe::egui_glow::CallbackFn::new(move |_info, painter| {
                    lock(&gl).paint(painter.gl());
                });
                ui.painter().add(egui::PaintCallback {
                    rect,
                    callback: Arc::new(callback),
                });
            }
        }
    }
}

fn lock(gl: &Mutex<GlPicture>) -> std::sync::MutexGuard<'_, GlPicture> {
    gl.lock().unwrap_or_else(PoisonError::into_inner)
}

/// I420 -> RGBA `ColorImage` on the CPU (the fallback; all pixels are opaque, so
/// unmultiplied and premultiplied RGBA are the same bytes).
fn color_image(picture: &Picture) -> egui::ColorImage {
    let size = [picture.width, picture.height];
    let rgba = picture.to_rgba();
    match bytemuck::allocation::try_cast_vec::<u8, egui::Color32>(rgba) {
        Ok(pixels) if pixels.len() == size[0] * size[1] => egui::ColorImage::new(size, pixels),
        Ok(pixels) => {
            tracing::warn!(len = pixels.len(), ?size, "picture of the wrong size");
            egui::ColorImage::new(size, vec![egui::Color32::BLACK; size[0] * size[1]])
        }
        Err((_, rgba)) => egui::ColorImage::from_rgba_unmultiplied(size, &rgba),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_fallback_converts_i420_to_rgba() {
        let mut picture = Picture::black(2, 2);
        picture.y_mut().copy_from_slice(&[235, 235, 16, 16]);
        let image = color_image(&picture);
        assert_eq!(
            image.pixels,
            vec![
                egui::Color32::WHITE,
                egui::Color32::WHITE,
                egui::Color32::BLACK,
                egui::Color32::BLACK
            ]
        );
    }
}
