// CPU BLAS / LAPACK for the kernel core.
//
// The CPU backend links the `scipy-openblas32` wheel (LP64 OpenBLAS), whose exported symbols
// carry a `scipy_` prefix. This header includes its CBLAS and LAPACKE headers and maps the
// standard names onto the prefixed ones, so kernels write `cblas_sgemm`, `LAPACKE_ssyevd`,
// ... as with any other BLAS. Only CPU sources include it.
#pragma once

#include <cblas.h>
#include <lapacke.h>

// Level 1
#define cblas_sdot scipy_cblas_sdot
#define cblas_ddot scipy_cblas_ddot
#define cblas_snrm2 scipy_cblas_snrm2
#define cblas_dnrm2 scipy_cblas_dnrm2
#define cblas_saxpy scipy_cblas_saxpy
#define cblas_daxpy scipy_cblas_daxpy
#define cblas_sscal scipy_cblas_sscal
#define cblas_dscal scipy_cblas_dscal
#define cblas_scopy scipy_cblas_scopy
#define cblas_dcopy scipy_cblas_dcopy
// Level 2
#define cblas_sgemv scipy_cblas_sgemv
#define cblas_dgemv scipy_cblas_dgemv
#define cblas_sger scipy_cblas_sger
#define cblas_dger scipy_cblas_dger
// Level 3
#define cblas_sgemm scipy_cblas_sgemm
#define cblas_dgemm scipy_cblas_dgemm
#define cblas_ssyrk scipy_cblas_ssyrk
#define cblas_dsyrk scipy_cblas_dsyrk
#define cblas_ssymm scipy_cblas_ssymm
#define cblas_dsymm scipy_cblas_dsymm
#define cblas_strsm scipy_cblas_strsm
#define cblas_dtrsm scipy_cblas_dtrsm
#define cblas_strmm scipy_cblas_strmm
#define cblas_dtrmm scipy_cblas_dtrmm
// LAPACKE: symmetric eigensolvers, QR, SVD, Cholesky
#define LAPACKE_ssyevd scipy_LAPACKE_ssyevd
#define LAPACKE_dsyevd scipy_LAPACKE_dsyevd
#define LAPACKE_ssyevr scipy_LAPACKE_ssyevr
#define LAPACKE_dsyevr scipy_LAPACKE_dsyevr
#define LAPACKE_ssyev scipy_LAPACKE_ssyev
#define LAPACKE_dsyev scipy_LAPACKE_dsyev
#define LAPACKE_sgeqrf scipy_LAPACKE_sgeqrf
#define LAPACKE_dgeqrf scipy_LAPACKE_dgeqrf
#define LAPACKE_sorgqr scipy_LAPACKE_sorgqr
#define LAPACKE_dorgqr scipy_LAPACKE_dorgqr
#define LAPACKE_sgesdd scipy_LAPACKE_sgesdd
#define LAPACKE_dgesdd scipy_LAPACKE_dgesdd
#define LAPACKE_sgesvd scipy_LAPACKE_sgesvd
#define LAPACKE_dgesvd scipy_LAPACKE_dgesvd
#define LAPACKE_spotrf scipy_LAPACKE_spotrf
#define LAPACKE_dpotrf scipy_LAPACKE_dpotrf
#define LAPACKE_ssyevd_work scipy_LAPACKE_ssyevd_work
#define LAPACKE_dsyevd_work scipy_LAPACKE_dsyevd_work
#define LAPACKE_sgeqrf_work scipy_LAPACKE_sgeqrf_work
#define LAPACKE_dgeqrf_work scipy_LAPACKE_dgeqrf_work
#define LAPACKE_sorgqr_work scipy_LAPACKE_sorgqr_work
#define LAPACKE_dorgqr_work scipy_LAPACKE_dorgqr_work
#define LAPACKE_sgesdd_work scipy_LAPACKE_sgesdd_work
#define LAPACKE_dgesdd_work scipy_LAPACKE_dgesdd_work
// Threading control and build information
#define openblas_set_num_threads scipy_openblas_set_num_threads
#define openblas_get_num_threads scipy_openblas_get_num_threads
#define openblas_get_config scipy_openblas_get_config
#define openblas_get_corename scipy_openblas_get_corename
#define openblas_get_parallel scipy_openblas_get_parallel
