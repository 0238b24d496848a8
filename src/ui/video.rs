//! Pictures from the media threads into textures.
//!
//! A [`PictureSlot`] holds the newest RGBA picture, converted on the thread that made it.
//! Here it is moved (not copied) into an `egui::ColorImage` and uploaded to the GPU: one
//! upload per new picture, nothing when none arrived.

use eframe::egui;

use crate::media::picture::{Picture, PictureSlot};

/// One video stream's texture.
pub struct VideoTexture {
    name: &'static str,
    texture: Option<egui::TextureHandle>,
    /// Pictures uploaded so far.
    pub uploads: u64,
}

impl VideoTexture {
    pub fn new(name: &'static str) -> VideoTexture {
        VideoTexture {
            name,
            texture: None,
            uploads: 0,
        }
    }

    /// Uploads the slot's picture if a new one is waiting.
    pub fn update(&mut self, ctx: &egui::Context, slot: &PictureSlot) {
        let Some(picture) = slot.take() else {
            return;
        };
        let image = color_image(picture);
        match &mut self.texture {
            Some(t) => t.set(image, egui::TextureOptions::LINEAR),
            None => {
                self.texture =
                    Some(ctx.load_texture(self.name, image, egui::TextureOptions::LINEAR));
            }
        }
        self.uploads += 1;
    }

    /// Forgets the picture (e.g. camera off), so nothing stale is shown.
    pub fn clear(&mut self) {
        self.texture = None;
    }

    pub fn texture(&self) -> Option<&egui::TextureHandle> {
        self.texture.as_ref()
    }

    /// The picture scaled to fit `area`, aspect kept, centred: the rect it covers.
    pub fn fit(&self, area: egui::Rect) -> Option<egui::Rect> {
        let size = self.texture.as_ref()?.size_vec2();
        let scale = (area.width() / size.x).min(area.height() / size.y);
        Some(egui::Rect::from_center_size(area.center(), size * scale))
    }

    /// Paints the picture into `rect` (stretched: call [`VideoTexture::fit`] first).
    pub fn paint(&self, ui: &egui::Ui, rect: egui::Rect) {
        if let Some(t) = &self.texture {
            let uv = egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0));
            ui.painter().image(t.id(), rect, uv, egui::Color32::WHITE);
        }
    }
}

/// RGBA bytes -> `ColorImage` without copying the pixels (all pixels are opaque, so
/// unmultiplied and premultiplied RGBA are the same bytes).
fn color_image(picture: Picture) -> egui::ColorImage {
    let size = [picture.width, picture.height];
    match bytemuck::allocation::try_cast_vec::<u8, egui::Color32>(picture.rgba) {
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
    fn pixels_are_moved_not_converted() {
        let picture = Picture {
            width: 2,
            height: 1,
            rgba: vec![255, 0, 0, 255, 0, 0, 255, 255],
        };
        let image = color_image(picture);
        assert_eq!(
            image.pixels,
            vec![egui::Color32::RED, egui::Color32::from_rgb(0, 0, 255)]
        );
    }
}
