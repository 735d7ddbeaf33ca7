// OpenBLAS's CBLAS interface (Debian/Ubuntu: libopenblas-dev puts cblas.h on the default
// include path through update-alternatives). It also declares openblas_set_num_threads.
#include <cblas.h>
