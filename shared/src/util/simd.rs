//! Run-time choice of the vector unit for plain loops.
//!
//! [`widest!`](crate::widest) defines a function whose body is compiled three times — for
//! AVX-512F, for AVX2 and for the baseline — and runs the widest one the CPU reports. The body
//! is ordinary Rust that the compiler vectorizes; nothing is fused or reassociated (Rust never
//! contracts `a * b + c`), so every variant gives the same bits, and the release build stays
//! portable (no `target-cpu` flag).

/// `widest! { /// docs
/// pub fn name(arg: Type, ...) -> Ret { body } }`: see the module docs. Arguments must be
/// plain identifiers with concrete types (no generics).
#[macro_export]
macro_rules! widest {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn plain($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    plain($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    plain($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            plain($($arg),*)
        }
    };
}
