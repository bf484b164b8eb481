//! Machine code: the Cranelift JIT module that owns it, and the call into it. Every `unsafe`
//! of DVM's JIT is here.
//!
//! Code is written once and never freed or changed while the `Arena` lives (the `JITModule`
//! keeps every function it finalized), so an `Entry` stays callable for as long as the arena
//! that made it; `DvmJit` keeps both together.
#![allow(unsafe_code)]

use crate::codegen::{self, HandBack, CTX_CHECK_AT, CTX_ENTRIES, CTX_GEN_TAG, CTX_INSTRUCTIONS};
use crate::JitError;
use cranelift_codegen::ir::UserFuncName;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Linkage, Module};
use dvm_engine::interp::Program;
use dvm_engine::native::NativeState;

/// What generated code reads and writes (offsets in `codegen::CTX_*`).
#[repr(C)]
struct Ctx {
    entries: u64,
    gen_tag: u64,
    instructions: u64,
    check_at: u64,
}

const _: () = {
    assert!(std::mem::offset_of!(Ctx, entries) == CTX_ENTRIES as usize);
    assert!(std::mem::offset_of!(Ctx, gen_tag) == CTX_GEN_TAG as usize);
    assert!(std::mem::offset_of!(Ctx, instructions) == CTX_INSTRUCTIONS as usize);
    assert!(std::mem::offset_of!(Ctx, check_at) == CTX_CHECK_AT as usize);
    assert!(std::mem::offset_of!(dvm_engine::tlb::TlbEntry, tag) == 0);
    assert!(std::mem::offset_of!(dvm_engine::tlb::TlbEntry, read) == 8);
    assert!(std::mem::offset_of!(dvm_engine::tlb::TlbEntry, write) == 16);
    assert!(std::mem::offset_of!(dvm_engine::tlb::TlbEntry, mask) == 24);
    assert!(std::mem::size_of::<dvm_engine::tlb::TlbEntry>() == 32);
};

type NativeFn = extern "C" fn(*mut Ctx) -> u64;

/// A compiled region, callable while the `Arena` that made it lives.
#[derive(Clone, Copy)]
pub struct Entry {
    function: NativeFn,
    pub start: usize,
    pub size: usize,
}

impl Entry {
    /// Runs the region; returns `(index, counted, reason)` as `codegen::encode_exit` encoded
    /// them.
    pub fn call(&self, state: &mut NativeState<'_>) -> (usize, bool, HandBack) {
        let mut ctx = Ctx {
            entries: state.tlb.entries() as u64,
            gen_tag: state.tlb.gen_tag(),
            instructions: state.instructions,
            check_at: state.check_at,
        };
        // Generated code dereferences `ctx` (live for the call) and, through the TLB, only
        // pointers of entries whose tag matches the generation, inside the page, with writes
        // only through non-null write pointers and marks only inside the mask
        // (`dvm_engine::tlb` invariants 1, 2, 4, 5). `TlbAccess` borrows the view exclusively
        // while `state` lives, so nothing changes the entries or frees their pages during the
        // call. Calling a function pointer needs no `unsafe`; the soundness of this call rests
        // on the code `Arena::compile` generated, which is why it lives in this module.
        let result = (self.function)(&mut ctx);
        state.instructions = ctx.instructions;
        (
            (result >> 3) as usize,
            result & 1 == 1,
            HandBack::from_code(result >> 1),
        )
    }
}

/// The JIT module and the scratch state compilation reuses.
pub struct Arena {
    module: JITModule,
    context: Context,
    builder: FunctionBuilderContext,
    functions: u32,
}

impl Arena {
    pub fn new() -> Result<Arena, JitError> {
        let mut flags = settings::builder();
        let set = |flags: &mut settings::Builder, name: &str, value: &str| {
            flags
                .set(name, value)
                .map_err(|err| JitError::Setup(format!("{name}={value}: {err}")))
        };
        set(&mut flags, "use_colocated_libcalls", "false")?;
        set(&mut flags, "is_pic", "false")?;
        set(&mut flags, "opt_level", "speed")?;
        // The instruction count lives in the pinned register (`codegen`); generated code
        // saves the caller's value and puts it back, as the C ABI wants of r15.
        set(&mut flags, "enable_pinned_reg", "true")?;
        // The IR is checked by the tests (a debug build of Cranelift verifies it anyway): in a
        // release build the verifier took a third of the compile time.
        set(
            &mut flags,
            "enable_verifier",
            if cfg!(debug_assertions) {
                "true"
            } else {
                "false"
            },
        )?;
        let isa = cranelift_native::builder()
            .map_err(|err| JitError::Setup(format!("host not supported: {err}")))?
            .finish(settings::Flags::new(flags))
            .map_err(|err| JitError::Setup(err.to_string()))?;
        let module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()));
        let context = module.make_context();
        Ok(Arena {
            module,
            context,
            builder: FunctionBuilderContext::new(),
            functions: 0,
        })
    }

    /// Compiles instructions `start..end` of `program` into native code.
    /// Compiles `start..end` as a function named `name` (or `name#N` if a region of that name
    /// exists): the name Cranelift itself writes to the perf map when run under `perf`, so it
    /// must be the one `perf script` should show.
    pub fn compile(
        &mut self,
        program: &Program,
        start: usize,
        end: usize,
        name: &str,
    ) -> Result<(Entry, String), JitError> {
        let mut name = name.to_string();
        if self.module.get_name(&name).is_some() {
            name = format!("{name}#{}", self.functions);
        }
        self.functions += 1;
        let signature = codegen::signature(self.module.isa().default_call_conv());
        let id = self
            .module
            .declare_function(&name, Linkage::Local, &signature)
            .map_err(|err| JitError::Compile(err.to_string()))?;
        self.module.clear_context(&mut self.context);
        self.context.func.signature = signature;
        self.context.func.name = UserFuncName::user(0, id.as_u32());
        {
            let mut b = FunctionBuilder::new(&mut self.context.func, &mut self.builder);
            codegen::Translator::translate(&mut b, program, start, end);
            b.finalize(self.module.target_config());
        }
        // `DVM_JIT_DUMP=part-of-a-name` prints the machine code of the regions so named (the
        // way to see what the inner loops became; `perf` cannot annotate JIT code), and writes
        // its bytes to `/tmp/dvm-jit-<pid>-<n>.bin` with the address they run at, for
        // `objdump -D -b binary -m i386:x86-64 --adjust-vma=ADDRESS` next to `perf script`.
        let dump = std::env::var("DVM_JIT_DUMP")
            .ok()
            .is_some_and(|n| name.contains(&n));
        self.context.set_disasm(dump);
        self.module
            .define_function(id, &mut self.context)
            .map_err(|err| JitError::Compile(format!("{err:?}")))?;
        if dump {
            if let Some(code) = self.context.compiled_code() {
                eprintln!(
                    "{name}:\n{}{}",
                    crate::loops::describe(program, start, end),
                    code.vcode.clone().unwrap_or_default()
                );
            }
        }
        let bytes = self
            .context
            .compiled_code()
            .map(|code| code.code_buffer().to_vec())
            .unwrap_or_default();
        let size = bytes.len();
        self.module.clear_context(&mut self.context);
        self.module
            .finalize_definitions()
            .map_err(|err| JitError::Compile(err.to_string()))?;
        let code = self.module.get_finalized_function(id);
        // SAFETY: `code` is the finalized (executable, never freed while `self.module` lives)
        // function just defined with `codegen::signature`: one pointer-sized integer in, one
        // out, in the platform's default calling convention, which is `extern "C"`.
        let function = unsafe { std::mem::transmute::<*const u8, NativeFn>(code) };
        let entry = Entry {
            function,
            start: code as usize,
            size,
        };
        if dump {
            let path = format!("/tmp/dvm-jit-{}-{}.bin", std::process::id(), self.functions);
            match std::fs::write(&path, &bytes) {
                Ok(()) => eprintln!("{name}: {size} bytes at {:#x} in {path}", entry.start),
                Err(err) => eprintln!("{name}: cannot write {path}: {err}"),
            }
        }
        Ok((entry, name))
    }
}
