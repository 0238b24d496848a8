//! I420 pictures drawn by OpenGL: the Y, U and V planes are uploaded as three
//! one-channel textures and a fragment shader converts them to RGB (BT.601, limited
//! range, as `VideoFrame::to_rgba` does on the CPU) while drawing into the rect egui gave
//! the paint callback. OpenGL calls are `unsafe` in glow (they talk to the driver); each
//! is given the objects this module created on the same context, in the same thread.
#![allow(unsafe_code)]

use std::sync::Arc;

use eframe::egui_glow::ShaderVersion;
use eframe::glow::{self, HasContext as _};

use crate::media::picture::Picture;

/// One stream's picture on the GPU: the newest picture waiting to be uploaded, and the
/// OpenGL objects it is drawn with (made on the first paint, on egui's context).
#[derive(Default)]
pub struct GlPicture {
    pending: Option<Picture>,
    objects: Option<Objects>,
    /// Set when the objects could not be made (e.g. a driver without GLSL 1.40 / ES 3):
    /// the owner falls back to the CPU.
    failed: bool,
    /// Whether the textures hold a picture to show.
    shown: bool,
}

struct Objects {
    /// Kept for deleting the objects (on the UI thread, where egui's context lives).
    gl: Arc<glow::Context>,
    program: glow::Program,
    vertex_array: glow::VertexArray,
    /// Y, U, V.
    planes: [glow::Texture; 3],
    /// The size the textures were made for.
    size: (usize, usize),
}

impl GlPicture {
    /// Shows `picture` from the next paint on.
    pub fn show(&mut self, picture: Picture) {
        self.pending = Some(picture);
    }

    /// Shows nothing until the next picture.
    pub fn clear(&mut self) {
        self.pending = None;
        self.shown = false;
    }

    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Draws into the current viewport (egui_glow sets it to the callback's rect),
    /// uploading a new picture first.
    pub fn paint(&mut self, gl: &Arc<glow::Context>) {
        if self.failed {
            return;
        }
        if self.objects.is_none() {
            match Objects::new(gl) {
                Ok(o) => self.objects = Some(o),
                Err(e) => {
                    tracing::warn!(error = %e, "OpenGL video drawing unavailable");
                    self.failed = true;
                    return;
                }
            }
        }
        let Some(objects) = self.objects.as_mut() else {
            return;
        };
        if let Some(picture) = self.pending.take() {
            objects.upload(&picture);
            self.shown = true;
        }
        if self.shown {
            objects.draw();
        }
    }
}

const VERTEX: &str = r#"
const vec2 corners[4] = vec2[4](vec2(-1.0, -1.0), vec2(1.0, -1.0), vec2(-1.0, 1.0), vec2(1.0, 1.0));
out vec2 v_uv;
void main() {
    vec2 p = corners[gl_VertexID];
    // The picture's first row is at the top.
    v_uv = vec2((p.x + 1.0) * 0.5, (1.0 - p.y) * 0.5);
    gl_Position = vec4(p, 0.0, 1.0);
}
"#;

const FRAGMENT: &str = r#"
#ifdef GL_ES
precision mediump float;
#endif
uniform sampler2D u_y;
uniform sampler2D u_u;
uniform sampler2D u_v;
in vec2 v_uv;
out vec4 out_color;
void main() {
    float y = 1.1644 * (texture(u_y, v_uv).r - 0.0627);
    float u = texture(u_u, v_uv).r - 0.502;
    float v = texture(u_v, v_uv).r - 0.502;
    vec3 rgb = vec3(y + 1.5960 * v, y - 0.3917 * u - 0.8129 * v, y + 2.0172 * u);
    out_color = vec4(clamp(rgb, 0.0, 1.0), 1.0);
}
"#;

impl Objects {
    fn new(gl: &Arc<glow::Context>) -> Result<Objects, String> {
        let version = ShaderVersion::get(gl);
        if !version.is_new_shader_interface() {
            return Err(format!("{version:?} shaders are too old"));
        }
        // SAFETY: every object is created here on `gl`, egui's current context (paint
        // callbacks run on the thread that renders), and deleted again if a later step
        // fails.
        unsafe {
            let program = gl.create_program()?;
            let mut shaders = Vec::new();
            for (kind, source) in [
                (glow::VERTEX_SHADER, VERTEX),
                (glow::FRAGMENT_SHADER, FRAGMENT),
            ] {
                let shader = gl.create_shader(kind)?;
                gl.shader_source(
                    shader,
                    &format!("{}{source}", version.version_declaration()),
                );
                gl.compile_shader(shader);
                if !gl.get_shader_compile_status(shader) {
                    let log = gl.get_shader_info_log(shader);
                    gl.delete_shader(shader);
                    shaders.into_iter().for_each(|s| gl.delete_shader(s));
                    gl.delete_program(program);
                    return Err(format!("shader: {log}"));
                }
                gl.attach_shader(program, shader);
                shaders.push(shader);
            }
            gl.link_program(program);
            let linked = gl.get_program_link_status(program);
            for s in shaders {
                gl.detach_shader(program, s);
                gl.delete_shader(s);
            }
            if !linked {
                let log = gl.get_program_info_log(program);
                gl.delete_program(program);
                return Err(format!("program: {log}"));
            }
            gl.use_program(Some(program));
            for (unit, name) in ["u_y", "u_u", "u_v"].into_iter().enumerate() {
                let at = gl.get_uniform_location(program, name);
                gl.uniform_1_i32(at.as_ref(), unit as i32);
            }
            let vertex_array = gl.create_vertex_array()?;
            let mut planes = Vec::new();
            for _ in 0..3 {
                let texture = gl.create_texture()?;
                gl.bind_texture(glow::TEXTURE_2D, Some(texture));
                for (param, value) in [
                    (glow::TEXTURE_MIN_FILTER, glow::LINEAR),
                    (glow::TEXTURE_MAG_FILTER, glow::LINEAR),
                    (glow::TEXTURE_WRAP_S, glow::CLAMP_TO_EDGE),
                    (glow::TEXTURE_WRAP_T, glow::CLAMP_TO_EDGE),
                ] {
                    gl.tex_parameter_i32(glow::TEXTURE_2D, param, value as i32);
                }
                planes.push(texture);
            }
            gl.bind_texture(glow::TEXTURE_2D, None);
            let planes: [glow::Texture; 3] =
                planes.try_into().map_err(|_| "three textures".to_owned())?;
            Ok(Objects {
                gl: gl.clone(),
                program,
                vertex_array,
                planes,
                size: (0, 0),
            })
        }
    }

    fn upload(&mut self, picture: &Picture) {
        let (w, h) = (picture.width, picture.height);
        let resized = self.size != (w, h);
        let gl = &self.gl;
        // SAFETY: the textures are this module's, on egui's current context; each slice
        // holds exactly width x height bytes (the planes of an I420 frame of that size),
        // read with a row alignment of 1.
        unsafe {
            gl.pixel_store_i32(glow::UNPACK_ALIGNMENT, 1);
            for (texture, (pw, ph), data) in [
                (self.planes[0], (w, h), picture.y()),
                (self.planes[1], (w / 2, h / 2), picture.u()),
                (self.planes[2], (w / 2, h / 2), picture.v()),
            ] {
                if data.len() < pw * ph {
                    continue;
                }
                let data = glow::PixelUnpackData::Slice(Some(&data[..pw * ph]));
                gl.bind_texture(glow::TEXTURE_2D, Some(texture));
                if resized {
                    gl.tex_image_2d(
                        glow::TEXTURE_2D,
                        0,
                        glow::R8 as i32,
                        pw as i32,
                        ph as i32,
                        0,
                        glow::RED,
                        glow::UNSIGNED_BYTE,
                        data,
                    );
                } else {
                    gl.tex_sub_image_2d(
                        glow::TEXTURE_2D,
                        0,
                        0,
                        0,
                        pw as i32,
                        ph as i32,
                        glow::RED,
                        glow::UNSIGNED_BYTE,
                        data,
                    );
                }
            }
            gl.bind_texture(glow::TEXTURE_2D, None);
            gl.pixel_store_i32(glow::UNPACK_ALIGNMENT, 4);
        }
        self.size = (w, h);
    }

    fn draw(&self) {
        let gl = &self.gl;
        // SAFETY: this module's program, vertex array and textures on egui's current
        // context; egui_glow restores its own state after the callback.
        unsafe {
            gl.use_program(Some(self.program));
            gl.bind_vertex_array(Some(self.vertex_array));
            for (unit, texture) in self.planes.iter().enumerate() {
                gl.active_texture(glow::TEXTURE0 + unit as u32);
                gl.bind_texture(glow::TEXTURE_2D, Some(*texture));
            }
            gl.draw_arrays(glow::TRIANGLE_STRIP, 0, 4);
            for unit in (0..3).rev() {
                gl.active_texture(glow::TEXTURE0 + unit);
                gl.bind_texture(glow::TEXTURE_2D, None);
            }
            gl.bind_vertex_array(None);
        }
    }
}

impl Drop for Objects {
    fn drop(&mut self) {
        // SAFETY: the objects were made on this context; a picture is dropped on the UI
        // thread (its owner, or egui's list of paint callbacks, both live there).
        unsafe {
            let gl = &self.gl;
            gl.delete_program(self.program);
            gl.delete_vertex_array(self.vertex_array);
            for t in self.planes {
                gl.delete_texture(t);
            }
        }
    }
}
