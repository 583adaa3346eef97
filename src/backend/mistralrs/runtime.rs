//! mistral.rs itself: loading an emitted GGUF file or model folder with stock mistralrs-core, raw logits,
//! prefill timing and chat replies. This is what verification and the app helper use;
//! nothing here knows about pruning.

use either::Either;
use indexmap::IndexMap;
use mistralrs_core::{
    AutoDeviceMapParams, Constraint, DefaultSchedulerMethod, DeviceMapSetting, GGUFLoaderBuilder,
    GGUFSpecificConfig, MistralRs, MistralRsBuilder, ModelDType, NormalLoaderBuilder,
    NormalRequest, NormalSpecificConfig, Request, RequestMessage, Response, SamplingParams,
    SchedulerConfig, TokenSource, TokenizationRequest,
};
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::mpsc::channel;
use ziplm_plugin_api::{AdapterError, AdapterResult};

fn err(context: &str) -> impl Fn(String) -> AdapterError + '_ {
    move |e| AdapterError::runtime(format!("mistral.rs {context}"), e)
}

/// A GGUF model loaded in mistral.rs (CPU, f32 activations), with its own async runtime.
pub struct LoadedModel {
    engine: Arc<MistralRs>,
    rt: tokio::runtime::Runtime,
    next_id: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel").finish_non_exhaustive()
    }
}

/// A reply and the engine's own timings.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    /// Generated text.
    pub text: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Seconds the engine spent on the prompt (prefill).
    pub prompt_s: f64,
    /// Seconds the engine spent generating.
    pub completion_s: f64,
}

impl LoadedModel {
    /// Loads a model the way `mistralrs` serves it, f32 on the CPU, no prefix cache: a GGUF
    /// file with the stock GGUF loader (tokenizer and chat template from its metadata), or
    /// a Hugging Face folder with the stock loader its `config.json` names.
    pub fn load(path: &Path) -> AdapterResult<LoadedModel> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| AdapterError::runtime("starting an async runtime", e))?;
        let loader = if path.is_dir() {
            // A Hugging Face folder: the stock loader for its `architectures` entry
            // (folders ziplm writes say MistralForCausalLM).
            NormalLoaderBuilder::new(
                NormalSpecificConfig::default(),
                None,
                None,
                Some(path.to_string_lossy().into_owned()),
                false,
                None,
            )
            .build(None)
            .map_err(|e| {
                AdapterError::runtime(
                    format!("mistral.rs reading {}", path.display()),
                    format!("{e:#}"),
                )
            })?
        } else {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let file = path.file_name().and_then(|f| f.to_str()).ok_or_else(|| {
                AdapterError::InvalidRequest(format!("{}: not a file name", path.display()))
            })?;
            GGUFLoaderBuilder::new(
                None,
                None,
                dir.to_string_lossy().into_owned(),
                vec![file.to_string()],
                GGUFSpecificConfig { topology: None },
                false,
                None,
            )
            .build()
        };
        let load_pipeline = || {
            rt.block_on(async {
                loader.load_model_from_hf(
                    None,
                    TokenSource::None,
                    &ModelDType::F32,
                    &super::target_device(),
                    true,
                    DeviceMapSetting::Auto(AutoDeviceMapParams::default_text()),
                    None,
                    None,
                )
            })
            .map_err(|e| {
                AdapterError::runtime(
                    format!("mistral.rs loading {}", path.display()),
                    format!("{e:#}"),
                )
            })
        };
        // mistralrs-core 0.8.1 starts its engine thread and then takes the pipeline's
        // lock with `try_lock().unwrap()` (lib.rs:733): when the new engine thread holds
        // it at that moment, the build panics. The race is rare; the model is loaded and
        // the engine built again (at most three times).
        let mut attempts = 0;
        let engine = loop {
            attempts += 1;
            let pipeline = load_pipeline()?;
            let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                rt.block_on(async {
                    MistralRsBuilder::new(
                        pipeline,
                        SchedulerConfig::DefaultScheduler {
                            // One sequence at a time: on the CPU, mistralrs-core 0.8.1
                            // decoding 8 chat requests together took longer than one
                            // after another and garbled the replies' first tokens.
                            method: DefaultSchedulerMethod::Fixed(
                                NonZeroUsize::new(1).expect("1 > 0"),
                            ),
                        },
                        false,
                        None,
                    )
                    .with_no_prefix_cache(true)
                    .build()
                    .await
                })
            }));
            match built {
                Ok(engine) => break engine,
                Err(_) if attempts < 3 => continue,
                Err(_) => return Err(AdapterError::runtime(
                    format!("mistral.rs starting the engine for {}", path.display()),
                    "the engine failed to start three times (mistralrs-core's pipeline lock race)",
                )),
            }
        };
        Ok(LoadedModel {
            engine,
            rt,
            next_id: 0.into(),
        })
    }

    fn send(&self, messages: RequestMessage, max_len: usize, raw: bool) -> AdapterResult<Response> {
        let (tx, rx) = channel(16);
        let mut sampling = SamplingParams::deterministic();
        sampling.max_len = Some(max_len);
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let request = Request::Normal(Box::new(NormalRequest {
            messages,
            sampling_params: sampling,
            response: tx,
            return_logprobs: false,
            is_streaming: false,
            id,
            constraint: Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: None,
            return_raw_logits: raw,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        }));
        self.round_trip("request", request, rx)
    }

    /// Sends a request to the engine and waits for its one answer on `rx`.
    fn round_trip<T>(
        &self,
        what: &str,
        request: Request,
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> AdapterResult<T> {
        let sender = self
            .engine
            .get_sender(None)
            .map_err(|e| AdapterError::runtime("mistral.rs engine", format!("{e:?}")))?;
        self.rt.block_on(async {
            sender
                .send(request)
                .await
                .map_err(|e| err(what)(e.to_string()))?;
            rx.recv()
                .await
                .ok_or_else(|| err(what)("the engine closed the response channel".into()))
        })
    }

    /// `text` tokenised by mistral.rs's own tokenizer of this model (the one it serves
    /// with), without special tokens when `special` is false.
    pub fn tokenize(&self, text: &str, special: bool) -> AdapterResult<Vec<u32>> {
        self.tokenize_request("tokenize", Either::Right(text.to_string()), false, special)
    }

    /// A conversation of `(role, content)` turns through the model's chat template (as
    /// a chat request renders it; with the prompt for the assistant's next reply when
    /// `reply_prompt`), tokenised.
    pub fn tokenize_chat(
        &self,
        turns: &[(&str, &str)],
        reply_prompt: bool,
    ) -> AdapterResult<Vec<u32>> {
        let turns = turns.iter().map(|(r, c)| message(r, c)).collect();
        self.tokenize_request("chat template", Either::Left(turns), reply_prompt, true)
    }

    fn tokenize_request(
        &self,
        what: &str,
        text: Either<Vec<IndexMap<String, mistralrs_core::MessageContent>>, String>,
        reply_prompt: bool,
        special: bool,
    ) -> AdapterResult<Vec<u32>> {
        let (tx, rx) = channel(1);
        let request = Request::Tokenize(TokenizationRequest {
            text,
            tools: None,
            add_generation_prompt: reply_prompt,
            add_special_tokens: special,
            enable_thinking: None,
            reasoning_effort: None,
            response: tx,
        });
        self.round_trip(what, request, rx)?
            .map_err(|e| err(what)(e.to_string()))
    }

    /// `ids` as text, by mistral.rs's tokenizer of this model; special tokens left out
    /// when `skip_special`.
    pub fn detokenize(&self, ids: &[u32], skip_special: bool) -> AdapterResult<String> {
        let (tx, rx) = channel(1);
        let request = Request::Detokenize(mistralrs_core::DetokenizationRequest {
            tokens: ids.to_vec(),
            skip_special_tokens: skip_special,
            response: tx,
        });
        self.round_trip("detokenize", request, rx)?
            .map_err(|e| err("detokenize")(e.to_string()))
    }

    /// The logits of every position of `ids` (one row of `vocab` values per token).
    pub fn logits(&self, ids: &[u32]) -> AdapterResult<Vec<Vec<f32>>> {
        match self.send(RequestMessage::CompletionTokens(ids.to_vec()), 1, true)? {
            Response::Raw { logits_chunks, .. } => {
                let mut rows = vec![];
                for chunk in logits_chunks {
                    let chunk = chunk
                        .to_dtype(candle_core::DType::F32)
                        .and_then(|c| {
                            let v = c.dims().last().copied().unwrap_or(0);
                            c.reshape(((), v))
                        })
                        .and_then(|c| c.to_vec2::<f32>())
                        .map_err(|e| err("logits")(e.to_string()))?;
                    rows.extend(chunk);
                }
                Ok(rows)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Runs a prompt of token ids and samples one token (a prefill, as `mistralrs
    /// bench` times it); returns the wall time of the whole request. (The engine's
    /// own `total_prompt_time_sec` reads 0 for such one-token requests on the CPU.)
    pub fn prefill(&self, ids: &[u32]) -> AdapterResult<std::time::Duration> {
        let start = std::time::Instant::now();
        match self.send(RequestMessage::CompletionTokens(ids.to_vec()), 1, false)? {
            Response::CompletionDone(_) => Ok(start.elapsed()),
            other => Err(unexpected(other)),
        }
    }

    /// Runs a prompt of token ids and greedily generates up to `max_tokens` tokens;
    /// returns the wall time of the request and the tokens generated.
    pub fn generate(
        &self,
        ids: &[u32],
        max_tokens: usize,
    ) -> AdapterResult<(std::time::Duration, usize)> {
        let start = std::time::Instant::now();
        match self.send(
            RequestMessage::CompletionTokens(ids.to_vec()),
            max_tokens,
            false,
        )? {
            Response::CompletionDone(r) => Ok((start.elapsed(), r.usage.completion_tokens)),
            other => Err(unexpected(other)),
        }
    }

    /// Decode time per token after a prompt of `ids` (the KV cache it fills): the wall
    /// time of generating `1 + steps` tokens minus that of generating one (the same
    /// prefill), divided by the extra tokens generated.
    pub fn decode_step(&self, ids: &[u32], steps: usize) -> AdapterResult<std::time::Duration> {
        let (one, _) = self.generate(ids, 1)?;
        let (many, n) = self.generate(ids, 1 + steps.max(1))?;
        if n < 2 {
            return Err(AdapterError::runtime(
                "mistral.rs decode timing",
                "the model ended its reply after one token; time decode on another prompt",
            ));
        }
        Ok(many.saturating_sub(one) / (n as u32 - 1))
    }

    /// Greedy reply to one user message, through the model's chat template.
    pub fn chat(&self, user: &str, max_tokens: usize) -> AdapterResult<Reply> {
        let msg = RequestMessage::Chat {
            messages: vec![message("user", user)],
            enable_thinking: None,
            reasoning_effort: None,
        };
        match self.send(msg, max_tokens, false)? {
            Response::Done(r) => Ok(Reply {
                text: r
                    .choices
                    .first()
                    .and_then(|c| c.message.content.clone())
                    .unwrap_or_default(),
                prompt_tokens: r.usage.prompt_tokens,
                completion_tokens: r.usage.completion_tokens,
                prompt_s: r.usage.total_prompt_time_sec as f64,
                completion_s: r.usage.total_completion_time_sec as f64,
            }),
            other => Err(unexpected(other)),
        }
    }
}

/// One chat message.
fn message(role: &str, content: &str) -> IndexMap<String, mistralrs_core::MessageContent> {
    let mut m = IndexMap::new();
    m.insert("role".to_string(), Either::Left(role.to_string()));
    m.insert("content".to_string(), Either::Left(content.to_string()));
    m
}

fn unexpected(r: Response) -> AdapterError {
    let what = match r {
        Response::InternalError(e) => format!("internal error: {e}"),
        Response::ValidationError(e) => format!("validation error: {e}"),
        Response::ModelError(e, _) | Response::CompletionModelError(e, _) => {
            format!("model error: {e}")
        }
        _ => "an unexpected kind of response".into(),
    };
    AdapterError::runtime("mistral.rs request", what)
}

impl Drop for LoadedModel {
    fn drop(&mut self) {
        if let Ok(sender) = self.engine.get_sender(None) {
            let _ = self.rt.block_on(sender.send(Request::Terminate));
        }
    }
}
